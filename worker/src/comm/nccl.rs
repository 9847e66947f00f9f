//! The NCCL communicator for GPU workers, through cudarc's `nccl` module (libraries loaded
//! at run time, so it builds without CUDA). Rank 0's worker makes the unique id
//! ([`nccl_unique_id`]); the coordinator carries it to every rank in their assignments.
//!
//! Buffers are host `f32` slices staged through device memory, so the interface is the one
//! [`TcpComm`](super::TcpComm) has. Sub-communicators run over the world communicator with
//! grouped point-to-point transfers.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm as RawComm, Id, ReduceOp, group_end, group_start};

use super::{Comm, CommError, check_parts, sub_members};

/// Fails with a clear error, instead of cudarc's panic, where the driver or NCCL is missing.
fn check_libraries() -> Result<(), CommError> {
    // SAFETY: these only try to open the shared libraries.
    let (driver, nccl) = unsafe { (cudarc::driver::sys::is_culib_present(), cudarc::nccl::sys::is_culib_present()) };
    match (driver, nccl) {
        (true, true) => Ok(()),
        (false, _) => Err(CommError::Nccl("the CUDA driver library (libcuda) is not present on this machine".into())),
        (true, false) => Err(CommError::Nccl(
            "the NCCL library is not present on this machine (looked for libnccl.so on LD_LIBRARY_PATH; \
             pip's nvidia-nccl ships libnccl.so.2: link it as libnccl.so)"
                .into(),
        )),
    }
}

fn nccl_err(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> CommError + '_ {
    move |e| CommError::Nccl(format!("{what}: {e:?}"))
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> CommError + '_ {
    move |e| CommError::Nccl(format!("{what}: {e}"))
}

/// A new NCCL unique id (128 bytes), made by rank 0 of a group.
pub fn nccl_unique_id() -> Result<Vec<u8>, CommError> {
    check_libraries()?;
    let id = Id::new().map_err(nccl_err("ncclGetUniqueId"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// The world communicator, used by one thread at a time.
struct Shared {
    comm: Mutex<RawComm>,
    stream: Arc<CudaStream>,
}

// SAFETY: the NCCL communicator is only used under the mutex, one call at a time.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclComm")
    }
}

#[derive(Debug, Clone)]
pub struct NcclComm {
    shared: Arc<Shared>,
    /// World ranks of this communicator's members, ascending.
    members: Vec<usize>,
    me: usize,
}

impl NcclComm {
    /// Joins the group of `world` ranks identified by `unique_id` as `rank`, on GPU `device`.
    pub fn init(device: usize, rank: usize, world: usize, unique_id: &[u8]) -> Result<Self, CommError> {
        check_libraries()?;
        let internal: [std::ffi::c_char; 128] = unique_id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| CommError::Setup(format!("the NCCL unique id must be 128 bytes, got {}", unique_id.len())))?;
        let ctx = CudaContext::new(device).map_err(cuda_err("opening the GPU"))?;
        let stream = ctx.default_stream();
        let comm = RawComm::from_rank(stream.clone(), rank, world, Id::uninit(internal)).map_err(nccl_err("ncclCommInitRank"))?;
        Ok(NcclComm { shared: Arc::new(Shared { comm: Mutex::new(comm), stream }), members: (0..world).collect(), me: rank })
    }

    fn is_world(&self) -> bool {
        self.members.len() == self.shared.comm.lock().unwrap_or_else(|e| e.into_inner()).world_size()
    }

    /// One grouped round of point-to-point transfers: `sends[m]` to member `m`, and
    /// `recv_lens[m]` elements from member `m` (self excluded).
    fn exchange(&self, sends: &[&[f32]], recv_lens: &[usize]) -> Result<Vec<Vec<f32>>, CommError> {
        let stream = &self.shared.stream;
        let comm = self.shared.comm.lock().unwrap_or_else(|e| e.into_inner());
        let mut send_bufs = Vec::new();
        let mut recv_bufs = Vec::new();
        for (m, _) in self.members.iter().enumerate().filter(|&(m, _)| m != self.me) {
            send_bufs.push((m, stream.clone_htod(sends[m]).map_err(cuda_err("staging a send"))?));
            recv_bufs.push((m, stream.alloc_zeros::<f32>(recv_lens[m].max(1)).map_err(cuda_err("allocating a receive"))?));
        }
        group_start().map_err(nccl_err("ncclGroupStart"))?;
        for ((m, s), (_, r)) in send_bufs.iter().zip(recv_bufs.iter_mut()) {
            let peer = self.members[*m] as i32;
            if !sends[*m].is_empty() {
                comm.send(s, peer).map_err(nccl_err("ncclSend"))?;
            }
            if recv_lens[*m] > 0 {
                comm.recv(r, peer).map_err(nccl_err("ncclRecv"))?;
            }
        }
        group_end().map_err(nccl_err("ncclGroupEnd"))?;
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); self.members.len()];
        for (m, r) in recv_bufs {
            let mut host = stream.clone_dtoh(&r).map_err(cuda_err("copying a receive back"))?;
            host.truncate(recv_lens[m]);
            out[m] = host;
        }
        out[self.me] = sends[self.me].to_vec();
        Ok(out)
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.me
    }

    fn world(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        if data.is_empty() {
            return Ok(());
        }
        // The world communicator always goes through NCCL, at world size 1 too.
        if self.is_world() {
            let stream = &self.shared.stream;
            let comm = self.shared.comm.lock().unwrap_or_else(|e| e.into_inner());
            let send = stream.clone_htod(&*data).map_err(cuda_err("staging"))?;
            let mut recv = stream.alloc_zeros::<f32>(data.len()).map_err(cuda_err("allocating"))?;
            comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).map_err(nccl_err("ncclAllReduce"))?;
            stream.memcpy_dtoh(&recv, data).map_err(cuda_err("copying back"))?;
            return Ok(());
        }
        let all = self.all_gather(data)?;
        data.copy_from_slice(&all[..data.len()]);
        for part in all.chunks_exact(data.len()).skip(1) {
            data.iter_mut().zip(part).for_each(|(d, p)| *d += p);
        }
        Ok(())
    }

    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError> {
        let n = self.members.len();
        let out = self.exchange(&vec![data; n], &vec![data.len(); n])?;
        Ok(out.concat())
    }

    fn all_to_all_v(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CommError> {
        check_parts(&send, self.members.len())?;
        // Counts first (exact in f32 up to 2^24 per part, far above any step's rows).
        let counts: Vec<Vec<f32>> = send.iter().map(|s| vec![s.len() as f32]).collect();
        let count_refs: Vec<&[f32]> = counts.iter().map(Vec::as_slice).collect();
        let got = self.exchange(&count_refs, &vec![1; self.members.len()])?;
        let lens: Vec<usize> = got.iter().map(|c| c.first().copied().unwrap_or(0.0) as usize).collect();
        let refs: Vec<&[f32]> = send.iter().map(Vec::as_slice).collect();
        self.exchange(&refs, &lens)
    }

    fn send(&self, to: usize, data: &[f32]) -> Result<(), CommError> {
        let mut sends: Vec<&[f32]> = vec![&[]; self.members.len()];
        sends[to] = data;
        self.exchange(&sends, &vec![0; self.members.len()]).map(drop)
    }

    fn recv(&self, from: usize, len: usize) -> Result<Vec<f32>, CommError> {
        let mut lens = vec![0; self.members.len()];
        lens[from] = len;
        let sends: Vec<&[f32]> = vec![&[]; self.members.len()];
        Ok(std::mem::take(&mut self.exchange(&sends, &lens)?[from]))
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        let n = self.members.len();
        if self.me == root {
            let sends = vec![&*data; n];
            self.exchange(&sends, &vec![0; n]).map(drop)
        } else {
            let got = self.recv(root, data.len())?;
            data.copy_from_slice(&got);
            Ok(())
        }
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut token = [0f32];
        self.all_reduce_sum(&mut token)?;
        self.shared.stream.synchronize().map_err(cuda_err("synchronizing"))
    }

    fn split(&self, ranks: &[usize]) -> Result<Arc<dyn Comm>, CommError> {
        let (members, me) = sub_members(&self.members, self.me, ranks)?;
        Ok(Arc::new(NcclComm { shared: self.shared.clone(), members, me }))
    }
}

#[cfg(test)]
mod tests {
    /// Where CUDA and NCCL are installed a unique id is made; elsewhere the error says which
    /// library is missing (never cudarc's panic).
    #[test]
    fn makes_a_unique_id_or_says_which_library_is_missing() {
        // SAFETY: these only try to open the shared libraries.
        let present = unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() };
        match super::nccl_unique_id() {
            Ok(id) => {
                assert!(present);
                assert_eq!(id.len(), 128);
            }
            Err(e) => {
                assert!(!present, "{e}");
                assert!(e.to_string().contains("is not present on this machine"), "{e}");
            }
        }
    }
}
