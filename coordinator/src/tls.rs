//! TLS for the client APIs (`--tls-cert`, `--tls-key`, PEM): rustls through tonic for gRPC, and
//! a TLS listener for the HTTP server whose handshakes run concurrently (a slow or plain-text
//! client delays no other).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

/// The certificate (chain) and key the client APIs present.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// Serve the client APIs (gRPC and HTTP) over TLS with this certificate chain (PEM).
    #[arg(long, env = "TRAMONTANE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "TRAMONTANE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// The client APIs' TLS, read and checked at start.
#[derive(Clone)]
pub struct ServerTls {
    pem: (Vec<u8>, Vec<u8>),
    rustls: Arc<tokio_rustls::rustls::ServerConfig>,
}

impl ServerTls {
    /// `None` without `--tls-cert`.
    pub fn load(args: &TlsArgs) -> anyhow::Result<Option<Self>> {
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
        let cert_pem = std::fs::read(cert).with_context(|| format!("--tls-cert {}", cert.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("--tls-key {}", key.display()))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .with_context(|| format!("--tls-cert {}: not PEM certificates", cert.display()))?;
        anyhow::ensure!(!chain.is_empty(), "--tls-cert {}: no certificate in it", cert.display());
        let private = PrivateKeyDer::from_pem_slice(&key_pem).with_context(|| format!("--tls-key {}: no PEM private key in it", key.display()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .context("--tls-cert and --tls-key do not match")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(ServerTls { pem: (cert_pem, key_pem), rustls: Arc::new(config) }))
    }

    /// tonic's configuration of the same certificate.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(&self.pem.0, &self.pem.1))
    }
}

/// Longest a client may take over its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The HTTP server's listener over TLS: connections come out of it once their handshake is
/// done.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, tls: &ServerTls) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(tls.rustls.clone());
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, done) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor task ended (it does not while the listener lives).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
