//! The network edge: everything between a TLS connection and a domain call.
//! Each layer has one job (tls → identity → limits → audit → authz), and
//! `api` turns proto messages into domain requests and results back.

pub mod api;
pub mod audit;
pub mod authz;
pub mod identity;
pub mod limits;
pub mod tls;
