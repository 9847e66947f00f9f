//! The engine thread and the worker's gRPC face: [`EngineHandle`] sends the thread commands
//! (a reshape's shard is built on a loader thread of its own and installed by the engine
//! thread), and [`serve`] answers the worker API with it.

use proto::tramontane::worker::v1 as pb;
use tokio::sync::{mpsc, oneshot};

use super::{Begin, CommSetup, Prepared, ServiceError, WorkerState, build, create_nccl_id};
use crate::backend::Backend;
use crate::engine::Engine;

enum Command {
    Release(u64, oneshot::Sender<Result<(), ServiceError>>),
    Fence(u64, oneshot::Sender<Result<(), ServiceError>>),
    Load(Box<pb::LoadAssignmentRequest>, oneshot::Sender<Result<pb::LoadAssignmentResponse, ServiceError>>),
    Step(pb::StepRequest, oneshot::Sender<Result<pb::StepResponse, ServiceError>>),
    /// A shard built beside the current one, off the engine's thread: an [`Installing`] of
    /// the engine thread's backend.
    Install(Box<dyn std::any::Any + Send>),
    Health(oneshot::Sender<pb::HealthResponse>),
}

/// A shard a loader thread built, on its way back to the engine thread.
struct Installing<B: Backend> {
    prepared: Box<Prepared>,
    built: Result<Engine<B>, ServiceError>,
    reply: oneshot::Sender<Result<pb::LoadAssignmentResponse, ServiceError>>,
}

/// Clonable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    /// Cancelled when the coordinator releases this worker (the process then exits).
    released: tokio_util::sync::CancellationToken,
    offer: Offer,
}

/// What a worker offers the cluster, fixed when it starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Offer {
    /// Memory for weights and KV cache (0 = unknown).
    pub memory_bytes: u64,
    /// How many times a supervisor restarted this worker after it died.
    pub restarts: u32,
}

impl EngineHandle {
    /// Starts the engine thread on `backend`; it stops when every handle is dropped. Health
    /// reports the `offer`.
    pub fn spawn<B: Backend>(backend: B, comm: CommSetup, offer: Offer) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        let weak = tx.downgrade();
        std::thread::Builder::new().name("engine".into()).spawn(move || {
            let mut state = WorkerState::new(backend, comm).with_offer(offer);
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    Command::Release(epoch, reply) => {
                        let _ = reply.send(state.fence(epoch, "released by the coordinator"));
                    }
                    Command::Fence(epoch, reply) => {
                        let _ = reply.send(state.fence(epoch, &format!("fenced: placement epoch {epoch} does not use this worker")));
                    }
                    Command::Load(req, reply) => match state.begin(&req) {
                        Ok(Begin::Build { prepared, alongside: true }) => {
                            // A reshape: the current shard keeps serving while this one links
                            // and loads on a thread of its own.
                            let (backend, comm, weak) = (state.backend(), state.comm(), weak.clone());
                            let loader = std::thread::Builder::new().name("loader".into()).spawn(move || {
                                let built = build(backend, &comm, &prepared);
                                if let Some(tx) = weak.upgrade() {
                                    let _ = tx.blocking_send(Command::Install(Box::new(Installing { prepared, built, reply })));
                                }
                            });
                            if let Err(e) = loader {
                                tracing::error!(error = %e, "cannot start a loader thread");
                            }
                        }
                        Ok(Begin::Build { prepared, alongside: false }) => {
                            let built = build(state.backend(), &state.comm(), &prepared);
                            let _ = reply.send(state.install(*prepared, false, built));
                        }
                        Ok(Begin::Done(response)) => {
                            let _ = reply.send(Ok(response));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    },
                    Command::Install(any) => match any.downcast::<Installing<B>>() {
                        Ok(i) => {
                            let _ = i.reply.send(state.install(*i.prepared, true, i.built));
                        }
                        Err(_) => tracing::error!("a shard built for another backend"),
                    },
                    Command::Step(req, reply) => {
                        let _ = reply.send(state.step(&req));
                    }
                    Command::Health(reply) => {
                        let _ = reply.send(state.health());
                    }
                }
            }
        })?;
        Ok(EngineHandle { tx, released: tokio_util::sync::CancellationToken::new(), offer })
    }

    /// What this worker offers (memory, restarts).
    pub fn offer(&self) -> Offer {
        self.offer
    }

    /// Fires when the coordinator has released this worker.
    pub fn released(&self) -> tokio_util::sync::CancellationToken {
        self.released.clone()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| ServiceError::EngineStopped)?;
        rx.await.map_err(|_| ServiceError::EngineStopped)
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for EngineHandle {
    async fn load_assignment(&self, request: tonic::Request<pb::LoadAssignmentRequest>) -> Result<tonic::Response<pb::LoadAssignmentResponse>, tonic::Status> {
        let req = request.into_inner();
        tracing::info!(epoch = req.epoch, model = %req.model_path, "loading assignment");
        let resp = self.call(|r| Command::Load(Box::new(req), r)).await??;
        Ok(tonic::Response::new(resp))
    }

    async fn step(&self, request: tonic::Request<pb::StepRequest>) -> Result<tonic::Response<pb::StepResponse>, tonic::Status> {
        let resp = self.call(|r| Command::Step(request.into_inner(), r)).await??;
        Ok(tonic::Response::new(resp))
    }

    async fn health(&self, _: tonic::Request<pb::HealthRequest>) -> Result<tonic::Response<pb::HealthResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.call(Command::Health).await?))
    }

    async fn release(&self, request: tonic::Request<pb::ReleaseRequest>) -> Result<tonic::Response<pb::ReleaseResponse>, tonic::Status> {
        let epoch = request.into_inner().epoch;
        self.call(|r| Command::Release(epoch, r)).await??;
        tracing::info!(epoch, "released by the coordinator; leaving");
        self.released.cancel();
        Ok(tonic::Response::new(pb::ReleaseResponse {}))
    }

    async fn fence(&self, request: tonic::Request<pb::FenceRequest>) -> Result<tonic::Response<pb::FenceResponse>, tonic::Status> {
        let epoch = request.into_inner().epoch;
        self.call(|r| Command::Fence(epoch, r)).await??;
        tracing::warn!(epoch, "fenced by the coordinator: this placement epoch does not use this worker");
        Ok(tonic::Response::new(pb::FenceResponse {}))
    }

    async fn create_nccl_id(&self, _: tonic::Request<pb::CreateNcclIdRequest>) -> Result<tonic::Response<pb::CreateNcclIdResponse>, tonic::Status> {
        let nccl_id = tokio::task::spawn_blocking(create_nccl_id).await.map_err(|_| ServiceError::EngineStopped)??;
        Ok(tonic::Response::new(pb::CreateNcclIdResponse { nccl_id }))
    }
}

/// Serves the worker API on `listener` until `shutdown` is cancelled or the coordinator
/// releases the worker; peers of sharded replicas link through `comm`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<&cluster::tls::ClusterTls>,
    handle: EngineHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let released = handle.released();
    let shutdown = {
        let s = shutdown.clone();
        tokio::spawn(async move {
            released.cancelled().await;
            // Let the Release reply reach the coordinator first.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            s.cancel();
        });
        shutdown
    };
    let incoming = crate::process::nodelay_incoming(listener);
    // The standard gRPC health service (Kubernetes' gRPC probes): SERVING while the worker
    // answers; whether it holds a shard is the coordinator's business (its Health RPC).
    let (_health, health_service) = tonic_health::server::health_reporter();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        // Mutual TLS: only a coordinator with a certificate of the cluster CA reaches the API.
        builder = builder.tls_config(tls.grpc_server())?;
    }
    let server = builder
        .add_service(health_service)
        .add_service(pb::worker_server::WorkerServer::new(handle).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    // A graceful close waits for the coordinator to drop its connection; it gets a moment
    // (its steps already fail, so it is moving this worker's sequences), then the worker exits.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    tokio::select! {
        served = server => served?,
        () = grace => tracing::info!("the coordinator keeps its connection open; closing it"),
    }
    Ok(())
}

/// The standard gRPC health service alone (SERVING while the process runs), for probes that
/// cannot present the cluster's certificate.
pub async fn serve_health(listener: tokio::net::TcpListener, shutdown: tokio_util::sync::CancellationToken) {
    let (_health, health_service) = tonic_health::server::health_reporter();
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .serve_with_incoming_shutdown(crate::process::nodelay_incoming(listener), shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the health service stopped");
    }
}
