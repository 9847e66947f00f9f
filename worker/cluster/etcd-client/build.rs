//! Compiles etcd's protos with protox (pure Rust) instead of a system `protoc`; otherwise
//! etcd-client 0.21.1's build script.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "proto";
    println!("cargo:rerun-if-changed={proto_root}");
    let files = [
        "proto/etcd/api/authpb/auth.proto",
        "proto/etcd/api/etcdserverpb/rpc.proto",
        "proto/etcd/api/mvccpb/kv.proto",
        "proto/etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
        "proto/etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
    ];
    let fds = protox::compile(files, [proto_root])?;
    tonic_prost_build::configure().build_server(cfg!(feature = "build-server")).compile_fds(fds)?;
    Ok(())
}
