//! The Tramontane coordinator library: scheduling and (to come) client APIs and placement.

pub mod scheduler;
