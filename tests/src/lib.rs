//! Test harness for covet-agent: every test gets its own sandbox of real
//! parts (a fresh PKI, a real agent process on a free loopback port, real
//! HTTP servers), torn down when the value is dropped, even on panic.
//!
//! Binaries are the workspace's own `covet-agent` and `covetctl`, built by
//! `cargo build --workspace --bins` before the tests run (see `.ci/run`).

pub mod agent;
pub mod container;
pub mod http;
pub mod load;
pub mod mariadb;
pub mod mysql_app;
pub mod nginx;
pub mod opwait;
pub mod pki;
pub mod postgres;
pub mod repos;
pub mod sampleapp;
pub mod sandbox;
pub mod slotted;
pub mod sqlite_app;
pub mod syspkg;

use std::path::PathBuf;

/// Path of a workspace binary next to the test executable's target dir.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/PROFILE/deps/, harness binaries from target/PROFILE/.
    let mut dir = exe.parent().expect("target directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target directory");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// A loopback TCP port nothing listens on right now.
pub fn try_free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// [`try_free_port`], panicking when the machine has none.
pub fn free_port() -> u16 {
    try_free_port().expect("a free loopback port")
}

/// A temporary directory for one test, kept on failure when COVET_KEEP_SANDBOX is set.
pub fn sandbox_dir(prefix: &str) -> tempfile::TempDir {
    let prefix = format!("covet-{prefix}-");
    let mut dir = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir()
        .expect("create sandbox dir");
    if std::env::var_os("COVET_KEEP_SANDBOX").is_some() {
        dir.disable_cleanup(true);
        eprintln!("sandbox (kept): {}", dir.path().display());
    }
    dir
}
