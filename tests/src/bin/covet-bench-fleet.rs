//! `covet-bench-fleet [N] [--ansible PYTHON COLLECTIONS]`: `covetctl -o json
//! info --nodes ...` against N lightweight agents (no apps; one shared PKI)
//! on loopback, measured end to end as a user runs it; target under 1 s for
//! 200 agents. With `--ansible`, also `ansible-playbook -f 50` of
//! `covet.agent.info` over the same agents (PYTHON: a venv's python with
//! clients/ansible/requirements.txt; COLLECTIONS: where covet.agent is
//! installed), measured the same way, and the same play with
//! `ansible.builtin.ping` (Ansible's own cost per host, the floor).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use covet_tests::agent::{AgentOptions, TestAgent};
use covet_tests::pki::TestPki;

const TARGET: Duration = Duration::from_secs(1);
const RUNS: usize = 5;
const ANSIBLE_RUNS: usize = 3;
const FORKS: &str = "50";

/// The Ansible side: a python with ansible-core and grpcio, and the
/// directory covet.agent is installed in.
struct AnsibleArgs {
    python: PathBuf,
    collections: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut n = 200;
    let mut ansible = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--ansible" {
            let (Some(python), Some(collections)) = (rest.next(), rest.next()) else {
                anyhow::bail!("--ansible takes PYTHON COLLECTIONS");
            };
            ansible = Some(AnsibleArgs {
                python: python.into(),
                collections: collections.into(),
            });
        } else {
            n = arg
                .parse()
                .with_context(|| format!("{arg:?} is not a count"))?;
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(n, ansible))
}

/// `samples` sorted: "median X ms of N runs (min, max)".
fn summary(samples: &mut [Duration]) -> (Duration, String) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let text = format!(
        "median {:.0} ms of {} runs (min {:.0} ms, max {:.0} ms)",
        median.as_secs_f64() * 1000.0,
        samples.len(),
        samples[0].as_secs_f64() * 1000.0,
        samples[samples.len() - 1].as_secs_f64() * 1000.0
    );
    (median, text)
}

/// One `ansible-playbook -f 50` of scripts/bench/PLAYBOOK over the agents;
/// every host must answer.
fn ansible_run(
    ansible: &AnsibleArgs,
    dir: &Path,
    inventory: &Path,
    pki: &Path,
    n: usize,
    playbook: &str,
) -> anyhow::Result<Duration> {
    let playbook = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/bench")
        .join(playbook);
    let started = Instant::now();
    let out = Command::new(&ansible.python)
        .args(["-m", "ansible.cli.playbook", "-f", FORKS, "-i"])
        .arg(inventory)
        .arg(&playbook)
        // What an operator's ansible.cfg would say: no retry files, no
        // facts, pipelining (no module file copied per host).
        .env(
            "ANSIBLE_CONFIG",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench/ansible.cfg"),
        )
        .env("ANSIBLE_COLLECTIONS_PATH", &ansible.collections)
        .env("ANSIBLE_HOME", dir.join("ansible-home"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env("COVET_CA", pki.join("ca.crt"))
        .env("COVET_CERT", pki.join("reader.crt"))
        .env("COVET_KEY", pki.join("reader.key"))
        .stdin(Stdio::null())
        .output()
        .context("run ansible-playbook")?;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "ansible-playbook failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = stdout
        .lines()
        .filter(|l| l.contains(" : ok=1 ") && l.contains(" failed=0 "))
        .count();
    ensure!(ok == n, "{ok} of {n} hosts answered:\n{stdout}");
    Ok(took)
}

async fn bench(n: usize, ansible: Option<AnsibleArgs>) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("covet-bench-fleet-")
        .tempdir()?;
    let pki_dir = dir.path().join("pki");
    TestPki::new(&pki_dir);
    println!("starting {n} agents...");
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let agent_dir = dir.path().join(format!("a{i:03}"));
        std::fs::create_dir_all(&agent_dir)?;
        let agent = TestAgent::start_with(
            &agent_dir,
            TestPki {
                dir: pki_dir.clone(),
            },
            AgentOptions::default(),
        )
        .await;
        agents.push(agent);
    }
    let nodes: Vec<String> = agents.iter().map(TestAgent::endpoint).collect();
    let config = agents[0].ctl_config(&["reader"]);
    let run = || -> anyhow::Result<Duration> {
        let started = Instant::now();
        let out = Command::new(covet_tests::bin("covetctl"))
            .arg("--config")
            .arg(&config)
            .args(["-o", "json", "info", "--nodes", &nodes.join(",")])
            .stdin(Stdio::null())
            .output()
            .context("run covetctl")?;
        let took = started.elapsed();
        ensure!(
            out.status.success(),
            "covetctl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answers: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ok = answers
            .as_array()
            .map_or(0, |a| a.iter().filter(|r| r["ok"] == true).count());
        ensure!(ok == n, "{ok} of {n} nodes answered");
        Ok(took)
    };
    run()?; // warm the page cache for the covetctl binary
    let mut samples: Vec<Duration> = (0..RUNS).map(|_| run()).collect::<Result<_, _>>()?;
    let (median, text) = summary(&mut samples);
    println!("covetctl -o json info over {n} agents (mTLS, --parallel 32): {text}");
    println!(
        "target < {} ms: ratio {:.2}",
        TARGET.as_millis(),
        median.as_secs_f64() / TARGET.as_secs_f64()
    );
    let Some(ansible) = ansible else {
        return Ok(());
    };
    let hosts: serde_json::Map<String, serde_json::Value> = nodes
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                format!("a{i:03}"),
                serde_json::json!({ "covet_endpoint": e }),
            )
        })
        .collect();
    let inventory = dir.path().join("inventory.yml");
    std::fs::write(
        &inventory,
        serde_json::to_vec(
            &serde_json::json!({ "all": { "children": { "covet": { "hosts": hosts } } } }),
        )?,
    )?;
    let run = |playbook| ansible_run(&ansible, dir.path(), &inventory, &pki_dir, n, playbook);
    run("ansible-info.yml")?; // warm: the page cache, the collection's compiled module_utils
    let mut samples: Vec<Duration> = (0..ANSIBLE_RUNS)
        .map(|_| run("ansible-info.yml"))
        .collect::<Result<_, _>>()?;
    let (info_median, text) = summary(&mut samples);
    println!("ansible-playbook -f {FORKS} of covet.agent.info over the same {n} agents: {text}");
    println!(
        "covet.agent.info / covetctl info: ratio {:.1}",
        info_median.as_secs_f64() / median.as_secs_f64()
    );
    // Ansible's own floor: the same play with ansible.builtin.ping.
    let mut samples: Vec<Duration> = (0..ANSIBLE_RUNS)
        .map(|_| run("ansible-ping.yml"))
        .collect::<Result<_, _>>()?;
    let (ping_median, text) = summary(&mut samples);
    println!("ansible-playbook -f {FORKS} of ansible.builtin.ping over the same {n} hosts: {text}");
    println!(
        "covet.agent.info / ansible.builtin.ping: ratio {:.2}",
        info_median.as_secs_f64() / ping_median.as_secs_f64()
    );
    Ok(())
}
