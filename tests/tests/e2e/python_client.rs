//! The Python example client (clients/python/) against a real agent: stubs
//! generated from proto/ with grpcio-tools, an upgrade over mTLS followed to
//! its end, covetctl's exit codes. grpcio comes from PyPI into a virtualenv
//! kept per machine (keyed by the requirements' hash) so it installs once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use covet_tests::agent::TestAgent;
use covet_tests::postgres::postgres_or_skip;
use covet_tests::sampleapp;
use covet_tests::sandbox::sandbox_or_skip;
use covet_tests::sandbox_dir;

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python")
}

/// A virtualenv with the client's requirements, built once per machine.
fn client_venv() -> Option<PathBuf> {
    python_venv(
        &client_dir().join("requirements.txt"),
        "/var/tmp/covet-pyclient-venv",
    )
}

/// A virtualenv of Debian's Python with `requirements` installed, at
/// `PREFIX-HASH` (the requirements' hash, so a change makes a new one),
/// built once: made beside its final path and renamed into place when
/// complete. None (the test skips) when pip cannot reach PyPI.
pub(crate) fn python_venv(requirements: &Path, prefix: &str) -> Option<PathBuf> {
    let text = std::fs::read(requirements).expect("read the requirements");
    let hash = hex_prefix(&text);
    let venv = PathBuf::from(format!("{prefix}-{hash}"));
    if venv.join("bin/python").exists() && venv.join(".complete").exists() {
        return Some(venv);
    }
    let partial = PathBuf::from(format!("{prefix}-{hash}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let made = Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&partial)
        .status()
        .is_ok_and(|s| s.success());
    assert!(made, "python3 -m venv failed");
    let pip = Command::new(partial.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check", "-r"])
        .arg(requirements)
        .output()
        .expect("run pip");
    if !pip.status.success() {
        // No PyPI here: say so rather than fail on the network.
        eprintln!(
            "skipped: pip could not install {}:\n{}",
            requirements.display(),
            String::from_utf8_lossy(&pip.stderr)
        );
        let _ = std::fs::remove_dir_all(&partial);
        return None;
    }
    std::fs::write(partial.join(".complete"), b"").expect("mark venv complete");
    // Another test run may have won the race: its venv is as good as ours.
    if std::fs::rename(&partial, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    Some(venv)
}

/// A short content hash (FNV-1a): stable across runs and machines.
fn hex_prefix(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn run_client(venv: &Path, agent: &TestAgent, version: &str) -> Output {
    let creds = agent.pki.client("operator");
    Command::new(venv.join("bin/python"))
        .arg(client_dir().join("covet_upgrade.py"))
        .arg(agent.endpoint())
        .args([&creds.ca, &creds.cert, &creds.key])
        .args([
            "covet",
            version,
            "--env-rename",
            "DATABASE_URI=DATABASE_URL",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run covet_upgrade.py")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_upgrades_over_mtls_with_covetctls_exit_codes() {
    let Some(venv) = client_venv() else { return };
    let dir = sandbox_dir("pyclient");
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    let Some(pg) = postgres_or_skip(&dir.path().join("pg")) else {
        return;
    };
    let app = sampleapp::install(&dir.path().join("app"), &pg, 5).unwrap();
    sandbox
        .install_unit(sampleapp::UNIT, &app.unit_file())
        .unwrap();
    assert!(
        sandbox
            .systemctl(&["start", sampleapp::UNIT])
            .status
            .success()
    );
    app.wait_json("/health", Duration::from_secs(10)).unwrap();
    let toml = format!(
        "{}{}\n",
        sandbox.agent_toml(Some("500ms")),
        app.agent_toml(&pg),
    );
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = TestAgent::start_with_toml(&agent_dir, toml).await;

    let out = run_client(&venv, &agent, "0.2.0");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{stderr}\n{}",
        agent.log()
    );
    assert!(stdout.contains("==> migrate"), "{stdout}");
    assert!(stdout.contains("final state: succeeded"), "{stdout}");

    // 0.2.1 fails its health gate: rolled back, exit 3.
    let out = run_client(&venv, &agent, "0.2.1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("final state: rolled_back"), "{stdout}");
}
