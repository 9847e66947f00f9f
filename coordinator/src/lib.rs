//! The Tramontane coordinator library: the client API, validation, per-replica scheduling.

pub mod api;
pub mod replica;
pub mod scheduler;
pub mod server;
pub mod validate;
