//! Links between ranks over mutual TLS (the cluster CA's, [`cluster::tls::ClusterTls`]): a
//! peer that presents no certificate the CA signed fails the handshake and never reaches the
//! epoch check. The TLS streams run on a small runtime of their own; the communicator's
//! threads see them as a blocking reader (with the collective timeout) and writer, as they
//! see a plain socket.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

use cluster::tls::ClusterTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

/// Longest a handshake (TLS and the epoch check) may take.
const HANDSHAKE: Duration = Duration::from_secs(2);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("comm-tls").enable_all().build().expect("the links' runtime starts")
    })
}

/// Runs `fut` on the links' runtime and waits for it (from any thread, async or not).
fn wait<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().expect("the links' runtime runs every task it is given")
}

fn tokio_stream(socket: &TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    let own = socket.try_clone()?;
    own.set_nonblocking(true)?;
    let _guard = runtime().enter();
    tokio::net::TcpStream::from_std(own)
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} took longer than {HANDSHAKE:?}"))
}

/// Opens TLS on a dialed `socket` (checking the peer's certificate), sends our `hello` and
/// returns the stream with the peer's one-byte answer.
pub(super) fn dial(tls: &ClusterTls, socket: &TcpStream, hello: [u8; 20]) -> std::io::Result<(TlsStream<tokio::net::TcpStream>, u8)> {
    let (config, name) = tls.link_client();
    let tcp = tokio_stream(socket)?;
    wait(async move {
        let talk = async {
            let mut s = TlsConnector::from(config).connect(name, tcp).await?;
            s.write_all(&hello).await?;
            s.flush().await?;
            let ack = s.read_u8().await?;
            Ok::<_, std::io::Error>((TlsStream::from(s), ack))
        };
        tokio::time::timeout(HANDSHAKE, talk).await.map_err(|_| timed_out("the TLS handshake"))?
    })
}

/// Accepts TLS on `socket` (requiring a certificate of the cluster CA), reads the peer's
/// hello and answers whether `judge` accepts it (as the peer it names).
pub(super) fn accept(
    tls: &ClusterTls,
    socket: &TcpStream,
    judge: impl FnOnce(&[u8; 20]) -> Option<usize> + Send + 'static,
) -> std::io::Result<Option<(usize, TlsStream<tokio::net::TcpStream>)>> {
    let acceptor = TlsAcceptor::from(tls.link_server());
    let tcp = tokio_stream(socket)?;
    wait(async move {
        let talk = async {
            let mut s = acceptor.accept(tcp).await?;
            let mut hello = [0u8; 20];
            s.read_exact(&mut hello).await?;
            let peer = judge(&hello);
            s.write_all(&[peer.is_some() as u8]).await?;
            s.flush().await?;
            Ok::<_, std::io::Error>(peer.map(|p| (p, TlsStream::from(s))))
        };
        tokio::time::timeout(HANDSHAKE, talk).await.map_err(|_| timed_out("the TLS handshake"))?
    })
}

/// Splits an established TLS link into a blocking reader (whose reads time out after
/// `timeout`) and writer, each served by a task on the links' runtime.
pub(super) fn split(stream: TlsStream<tokio::net::TcpStream>, timeout: Duration) -> (ChannelReader, ChannelWriter) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (chunks, rx) = mpsc::channel::<std::io::Result<Vec<u8>>>();
    runtime().spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    if chunks.send(Ok(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = chunks.send(Err(e));
                    return;
                }
            }
        }
    });
    let (tx, mut frames) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let (done_tx, done) = mpsc::sync_channel(1);
    runtime().spawn(async move {
        while let Some(frame) = frames.recv().await {
            match tokio::time::timeout(timeout, async { wr.write_all(&frame).await.and(wr.flush().await) }).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let _ = tokio::time::timeout(HANDSHAKE, wr.shutdown()).await;
        let _ = done_tx.send(());
    });
    let reader = ChannelReader { rx, chunk: Vec::new(), at: 0, timeout };
    (reader, ChannelWriter { tx: Some(tx), done, timeout })
}

/// The decrypted bytes of a link, as a blocking reader.
pub(super) struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
    timeout: Duration,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.chunk.len() {
            match self.rx.recv_timeout(self.timeout) {
                Ok(Ok(chunk)) => (self.chunk, self.at) = (chunk, 0),
                Ok(Err(e)) => return Err(e),
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(std::io::ErrorKind::TimedOut.into()),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A link's outgoing bytes, handed to its writing task; dropping it waits (up to the
/// timeout) until what was handed over is written.
pub(super) struct ChannelWriter {
    tx: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
    done: mpsc::Receiver<()>,
    timeout: Duration,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.tx {
            Some(tx) if tx.send(buf.to_vec()).is_ok() => Ok(buf.len()),
            _ => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        self.tx.take();
        let _ = self.done.recv_timeout(self.timeout);
    }
}
