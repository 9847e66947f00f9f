//! The Tramontane coordinator library: the client APIs (gRPC, OpenAI HTTP), validation,
//! per-replica drivers over the scheduler (`cluster::scheduler`).

pub mod api;
pub mod auth;
pub mod chat;
pub mod control;
pub mod frontend;
pub mod metrics;
pub mod openai;
pub mod planner;
pub mod replica;
pub mod server;
pub mod tls;
pub mod tools;
pub mod validate;
