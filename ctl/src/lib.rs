//! covetctl as a library: the PKI, the client configuration (contexts) and the
//! mTLS connector, shared by the binary and the test harness.

pub mod connect;
pub mod contexts;
pub mod pki;
