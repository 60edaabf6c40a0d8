//! covetctl as a library: the PKI, the client configuration (contexts) and the
//! mTLS connector, shared by the binary and the test harness.

// A panic on a daemon or CLI path loses the operation: errors are returned.
// Test code (compiled only under cfg(test)) may unwrap.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod connect;
pub mod contexts;
pub mod pki;
