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

/// The encoded `FileDescriptorSet` of every .proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tramontane_descriptor.bin"));
