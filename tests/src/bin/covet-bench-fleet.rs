//! `covet-bench-fleet [N]`: `covetctl -o json info --nodes ...` against N
//! lightweight agents (no apps; one shared PKI) on loopback, measured end to
//! end as a user runs it; target under 1 s for 200 agents.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use covet_tests::agent::{AgentOptions, TestAgent};
use covet_tests::pki::TestPki;

const TARGET: Duration = Duration::from_secs(1);
const RUNS: usize = 5;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(n))
}

async fn bench(n: usize) -> anyhow::Result<()> {
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
    samples.sort();
    let median = samples[RUNS / 2];
    println!(
        "covetctl -o json info over {n} agents (mTLS, --parallel 32): median {:.0} ms of {RUNS} runs (min {:.0} ms, max {:.0} ms)",
        median.as_secs_f64() * 1000.0,
        samples[0].as_secs_f64() * 1000.0,
        samples[RUNS - 1].as_secs_f64() * 1000.0
    );
    println!(
        "target < {} ms: ratio {:.2}",
        TARGET.as_millis(),
        median.as_secs_f64() / TARGET.as_secs_f64()
    );
    Ok(())
}
