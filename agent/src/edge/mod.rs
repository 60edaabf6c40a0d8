//! The network edge: everything between a TLS connection and a domain call.
//! Each layer has one job (tls → identity → limits → audit → authz), and
//! `api` turns proto messages into domain requests and results back.

pub(crate) mod api;
pub(crate) mod audit;
pub mod authz;
pub(crate) mod identity;
pub(crate) mod layer;
pub mod limits;
pub(crate) mod tls;
