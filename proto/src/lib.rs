//! Generated protobuf and gRPC code. Nothing but generated code lives here.

pub mod tramontane {
    pub mod v1 {
        tonic::include_proto!("tramontane.v1");
    }
    pub mod worker {
        pub mod v1 {
            tonic::include_proto!("tramontane.worker.v1");
        }
    }
}
