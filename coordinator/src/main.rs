//! The coordinator binary.

use clap::Parser;

/// Command-line configuration of the coordinator.
#[derive(Debug, Parser)]
#[command(version, about = "Tramontane coordinator")]
struct Args {
    /// Address of the gRPC API.
    #[arg(long, env = "TRAMONTANE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: std::net::SocketAddr,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    tracing::info!(grpc_addr = %args.grpc_addr, "coordinator configured");
    anyhow::bail!("the coordinator's serving loop is not built yet; use `worker generate` to run a model locally")
}
