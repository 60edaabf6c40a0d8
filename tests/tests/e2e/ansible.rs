//! The Ansible collection `covet.agent` (clients/ansible/) against real
//! agents: a pinned ansible-core and grpcio from PyPI in a venv under
//! target/ (kept while clients/ansible/requirements.txt is unchanged), the
//! collection built by clients/ansible/build.sh (stubs generated from
//! proto/) and installed with ansible-galaxy, real playbooks run by
//! ansible-playbook over the fleet harness of fleet.rs: a serial rollout
//! that stops at a broken host, check mode, reruns, a wrong certificate;
//! ansible-doc of every module and ansible-test sanity.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use covet_tests::sandbox_dir;
use covetctl::connect::Credentials;

use crate::fleet::{self, World, op};
use crate::python_client::python_venv;

const MODULES: [&str; 5] = ["upgrade", "rollback", "backup", "service", "info"];

fn ansible_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/ansible")
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The venv's python (ansible-core, grpcio), made once under target/; None
/// when PyPI is unreachable (the test skips).
fn ansible_python() -> Option<PathBuf> {
    let venv = python_venv(
        &ansible_dir().join("requirements.txt"),
        target_dir().join("ansible-venv").to_str().unwrap(),
    )?;
    Some(venv.join("bin/python"))
}

/// ansible-core with the collection built and installed, in `dir`.
struct Ansible {
    python: PathBuf,
    collections: PathBuf,
    dir: PathBuf,
}

/// The output of one ansible command.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// The venv (None: PyPI unreachable, the test skips), the collection built
/// into `dir/build` and installed into `dir/collections`.
fn ansible(dir: &Path) -> Option<Ansible> {
    let python = ansible_python()?;
    let build = dir.join("build");
    let out = Command::new(ansible_dir().join("build.sh"))
        .arg(&build)
        .env("PYTHON", &python)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tarball = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(tarball.ends_with("covet-agent-0.1.0.tar.gz"), "{tarball}");
    let ansible = Ansible {
        python,
        collections: dir.join("collections"),
        dir: dir.to_owned(),
    };
    let run = ansible.run(
        "galaxy",
        &[
            "collection",
            "install",
            "--force",
            "-p",
            ansible.collections.to_str().unwrap(),
            &tarball,
        ],
        &[],
    );
    assert_eq!(run.code, Some(0), "{}", run.text());
    Some(ansible)
}

impl Ansible {
    /// `python -m ansible.cli.CLI ARGS` with the collection, a private
    /// ANSIBLE_HOME, no colour, and `env` added.
    fn run(&self, cli: &str, args: &[&str], env: &[(&str, &Path)]) -> Run {
        let mut command = Command::new(&self.python);
        command
            .args(["-m", &format!("ansible.cli.{cli}")])
            .args(args)
            .current_dir(&self.dir)
            .env("ANSIBLE_COLLECTIONS_PATH", &self.collections)
            .env("ANSIBLE_HOME", self.dir.join("ansible-home"))
            .env("ANSIBLE_LOCAL_TEMP", self.dir.join("ansible-tmp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("ANSIBLE_DEPRECATION_WARNINGS", "0")
            .env("ANSIBLE_COLLECTIONS_SCAN_SYS_PATH", "0")
            .stdin(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let out = command.output().unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// ansible-playbook with `creds` in COVET_CA/CERT/KEY and each host's
    /// last result written to `tree` (the tree callback).
    fn playbook(&self, creds: &Credentials, tree: &Path, args: &[&str]) -> Run {
        self.run(
            "playbook",
            args,
            &[
                ("COVET_CA", &creds.ca),
                ("COVET_CERT", &creds.cert),
                ("COVET_KEY", &creds.key),
                (
                    "ANSIBLE_CALLBACKS_ENABLED",
                    Path::new("ansible.builtin.tree"),
                ),
                ("ANSIBLE_CALLBACK_TREE_DIR", tree),
            ],
        )
    }
}

/// An inventory of the group `covet`: host `nodeI` at agent I's endpoint.
fn inventory(dir: &Path, endpoints: &[String]) -> PathBuf {
    let hosts: serde_json::Map<String, serde_json::Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                format!("node{i}"),
                serde_json::json!({ "covet_endpoint": e }),
            )
        })
        .collect();
    let inventory = serde_json::json!({ "all": { "children": { "covet": { "hosts": hosts } } } });
    let path = dir.join("inventory.yml");
    std::fs::write(&path, serde_json::to_vec_pretty(&inventory).unwrap()).unwrap();
    path
}

/// PLAY RECAP: host -> {ok, changed, failed, ...}.
fn recap(stdout: &str) -> BTreeMap<String, BTreeMap<String, u32>> {
    let Some((_, tail)) = stdout.split_once("PLAY RECAP") else {
        panic!("no PLAY RECAP in\n{stdout}");
    };
    tail.lines()
        .filter_map(|line| {
            let (host, counts) = line.split_once(" : ")?;
            let counts = counts
                .split_whitespace()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect();
            Some((host.trim().to_owned(), counts))
        })
        .collect()
}

/// The last task result of `host` that the tree callback wrote.
fn last_result(tree: &Path, host: &str) -> serde_json::Value {
    let path = tree.join(host);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// `changed` and `failed` of a host's recap are what its agent recorded:
/// every succeeded operation changed something, every rolled-back upgrade
/// failed its task; a host the play never reached has no operation.
fn assert_recap_matches_records(
    w: &World,
    recap: &BTreeMap<String, BTreeMap<String, u32>>,
    before: &[usize],
) {
    for i in 0..w.fleet.agents.len() {
        let records = w.operations(i);
        let new = &records[before[i]..];
        let host = format!("node{i}");
        let count = |state: &str| new.iter().filter(|(_, s)| s == state).count() as u32;
        match recap.get(&host) {
            Some(counts) => {
                assert_eq!(counts["changed"], count("succeeded"), "{host}: {new:?}");
                assert_eq!(counts["failed"], count("rolled_back"), "{host}: {new:?}");
                assert_eq!(counts["unreachable"], 0, "{host}");
            }
            None => assert!(new.is_empty(), "{host} is not in the recap: {new:?}"),
        }
    }
}

fn record_counts(w: &World) -> Vec<usize> {
    (0..w.fleet.agents.len())
        .map(|i| w.operations(i).len())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_rollout_stops_at_the_broken_host_and_reruns_change_nothing() {
    let Some(w) = fleet::world(5).await else {
        return;
    };
    let Some(ansible) = ansible(w.dir.path()) else {
        return;
    };
    let inventory = inventory(w.dir.path(), &w.fleet.endpoints());
    let inventory = inventory.to_str().unwrap();
    let operator = w.fleet.agents[0].pki.client("operator");
    let rollout = |tree: &str, extra: &[&str]| {
        let tree = w.dir.path().join(tree);
        let mut args = vec![
            "-i",
            inventory,
            "covet.agent.rollout",
            "-e",
            r#"{"covet_version": "0.2.0", "covet_serial": [1, 2], "covet_watch": "2s"}"#,
        ];
        args.extend(extra);
        (ansible.playbook(&operator, &tree, &args), tree)
    };

    // Check mode: the agents' dry runs, the env change as the diff; nothing changes.
    let (run, tree) = rollout("tree-check", &["--check", "--diff"]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.text(), w.logs());
    let counts = recap(&run.stdout);
    assert_eq!(counts.len(), 5, "{}", run.stdout);
    for (host, c) in &counts {
        assert_eq!((c["ok"], c["changed"], c["failed"]), (2, 2, 0), "{host}");
        let plan = last_result(&tree, host);
        assert_eq!(plan["plan"]["from_version"], "0.1.9", "{plan}");
        assert!(
            plan["plan"]["steps"].as_array().unwrap().len() >= 5,
            "{plan}"
        );
    }
    assert!(
        run.stdout.contains("DATABASE_URI") && run.stdout.contains("DATABASE_URL"),
        "no env diff in\n{}",
        run.stdout
    );
    for i in 0..5 {
        assert!(
            w.operations(i).is_empty(),
            "check mode ran something on node{i}"
        );
        fleet::wait_version(&w.apps[i], "0.1.9").await;
    }

    // node2 (in the second batch) has the column 0.2.0's migration adds: it
    // fails there and its agent rolls it back; max_fail_percentage 0 stops
    // the play, node3 and node4 are never touched.
    w.pg.psql(
        &w.apps[2].db,
        "ALTER TABLE users ADD COLUMN last_login timestamptz",
    )
    .unwrap();
    let (run, tree) = rollout("tree-broken", &[]);
    assert_eq!(run.code, Some(2), "{}\n{}", run.text(), w.logs());
    let counts = recap(&run.stdout);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["node0", "node1", "node2"],
        "{}",
        run.stdout
    );
    assert_recap_matches_records(&w, &counts, &[0; 5]);
    for i in 0..2 {
        assert_eq!(
            w.operations(i),
            [op("backup_create", "succeeded"), op("upgrade", "succeeded")],
            "node{i}"
        );
        let result = last_result(&tree, &format!("node{i}"));
        assert_eq!(result["changed"], true);
        assert_eq!(result["from_version"], "0.1.9");
        assert_eq!(result["operation"]["state"], "succeeded");
        assert_eq!(
            result["operation_id"],
            w.operation_records(i)[1]["id"],
            "{result}"
        );
        assert!(
            result["env_diff"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l.as_str().unwrap().contains("DATABASE_URL")),
            "{result}"
        );
        fleet::wait_version(&w.apps[i], "0.2.0").await;
    }
    assert_eq!(
        w.operations(2),
        [
            op("backup_create", "succeeded"),
            op("upgrade", "rolled_back")
        ]
    );
    let failed = last_result(&tree, "node2");
    assert_eq!(failed["rolled_back"], true, "{failed}");
    assert_eq!(failed["operation"]["state"], "rolled_back");
    assert_eq!(failed["operation_id"], w.operation_records(2)[1]["id"]);
    let cause = failed["operation"]["cause"].as_str().unwrap();
    assert!(!cause.is_empty(), "{failed}");
    let msg = failed["msg"].as_str().unwrap();
    assert!(msg.contains("rolled back") && msg.contains(cause), "{msg}");
    assert!(
        failed["operation"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "migrate" && s["outcome"] == "failed"),
        "{failed}"
    );
    for i in 2..5 {
        fleet::wait_version(&w.apps[i], "0.1.9").await;
    }
    for i in 3..5 {
        assert!(w.operations(i).is_empty(), "node{i} was touched");
    }

    // node2 repaired, the same rollout again: the upgraded hosts change
    // nothing (fresh backup, version installed), the rest are upgraded.
    w.pg.psql(&w.apps[2].db, "ALTER TABLE users DROP COLUMN last_login")
        .unwrap();
    let before = record_counts(&w);
    let (run, _) = rollout("tree-rerun", &[]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.text(), w.logs());
    let counts = recap(&run.stdout);
    assert_eq!(counts.len(), 5, "{}", run.stdout);
    assert_recap_matches_records(&w, &counts, &before);
    let changed: Vec<u32> = counts.values().map(|c| c["changed"]).collect();
    assert_eq!(changed, [0, 0, 1, 2, 2], "{}", run.stdout);
    for app in &w.apps {
        fleet::wait_version(app, "0.2.0").await;
    }

    // And once more: idempotent, changed=0 everywhere, no new operation.
    let before = record_counts(&w);
    let (run, _) = rollout("tree-idempotent", &[]);
    assert_eq!(run.code, Some(0), "{}", run.text());
    let counts = recap(&run.stdout);
    assert_eq!(counts.len(), 5, "{}", run.stdout);
    for (host, c) in &counts {
        assert_eq!((c["changed"], c["failed"]), (0, 0), "{host}");
    }
    assert_eq!(record_counts(&w), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_module_is_documented_and_facts_and_connection_errors_are_clear() {
    let dir = sandbox_dir("ansible-facts");
    let Some(ansible) = ansible(dir.path()) else {
        return;
    };
    for module in MODULES {
        let name = format!("covet.agent.{module}");
        let run = ansible.run("doc", &[&name], &[]);
        assert_eq!(run.code, Some(0), "{}", run.text());
        assert!(
            run.stdout.contains("OPTIONS")
                && run.stdout.contains("EXAMPLES")
                && run.stdout.contains("RETURN VALUES")
                && run.stdout.contains("endpoint"),
            "{}",
            run.stdout
        );
        assert!(!run.stderr.contains("WARNING"), "{}", run.stderr);
    }
    let run = ansible.run("doc", &["-l", "covet.agent"], &[]);
    for module in MODULES {
        assert!(
            run.stdout.contains(&format!("covet.agent.{module} ")),
            "{}",
            run.stdout
        );
    }

    let fleet = fleet::bare_agents(dir.path(), 2).await;
    let dead = fleet::dead_endpoint();
    let mut endpoints = fleet.endpoints();
    endpoints.push(dead.clone());
    let inventory = inventory(dir.path(), &endpoints);
    let playbook = dir.path().join("facts.yml");
    std::fs::write(
        &playbook,
        r#"- hosts: covet
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
    - covet.agent.info:
    - ansible.builtin.copy:
        content: "{{ covet_agent | to_json }}"
        dest: "{{ playbook_dir }}/facts-{{ inventory_hostname }}.json"
        mode: "0600"
"#,
    )
    .unwrap();
    let agent = &fleet.agents[0];
    let tree = dir.path().join("tree");
    let args = [
        "-i",
        inventory.to_str().unwrap(),
        playbook.to_str().unwrap(),
    ];
    let operator = agent.pki.client("operator");
    let run = ansible.playbook(&operator, &tree, &args);
    assert_eq!(run.code, Some(2), "{}", run.text());
    let counts = recap(&run.stdout);
    for host in ["node0", "node1"] {
        assert_eq!(counts[host]["failed"], 0, "{}", run.stdout);
        let facts: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("facts-{host}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(facts["agent_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(facts["api_versions"][0], "v1");
        assert_eq!(facts["caller"]["role"], "operator");
        assert!(facts["apps"].as_array().unwrap().is_empty());
    }
    assert_eq!(counts["node2"]["failed"], 1);
    assert_eq!(
        last_result(&tree, "node2")["msg"],
        format!("connection refused at {dead}: is covet-agent running and listening there?")
    );

    // A client certificate of another CA; a CA that did not sign the agent.
    let foreign = agent.pki.foreign("stranger");
    let other_ca = Credentials {
        ca: agent.pki.dir.join("other/ca.crt"),
        ..operator.clone()
    };
    for (creds, words) in [
        (
            &foreign,
            "the agent refused your certificate: it is not issued by the agent's CA",
        ),
        (
            &other_ca,
            "the agent's certificate is not issued by your CA (check ca)",
        ),
    ] {
        let tree = dir.path().join("tree-wrong");
        let args = [
            "-i",
            inventory.to_str().unwrap(),
            playbook.to_str().unwrap(),
            "--limit",
            "node0",
        ];
        let run = ansible.playbook(creds, &tree, &args);
        assert_eq!(run.code, Some(2), "{}", run.text());
        assert_eq!(
            last_result(&tree, "node0")["msg"],
            format!("{}: {words}", agent.endpoint()),
            "{}",
            run.stdout
        );
    }
}

/// `ansible-test sanity --local` over the built collection, through
/// clients/ansible/sanity.sh (its venvs kept under target/ so reruns are
/// quick; see the script for the pip bootstrap it replaces).
#[test]
fn ansible_test_sanity_passes_on_the_built_collection() {
    let Some(python) = ansible_python() else {
        return;
    };
    let dir = sandbox_dir("ansible-sanity");
    let out = Command::new(ansible_dir().join("sanity.sh"))
        .arg(dir.path())
        .env("PYTHON", &python)
        .env("ANSIBLE_TEST_HOME", target_dir().join("ansible-test-home"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for test in [
        "validate-modules",
        "pylint",
        "pep8",
        "import",
        "ansible-doc",
        "yamllint",
    ] {
        assert!(
            text.contains(&format!("Running sanity test \"{test}\"")),
            "{test} did not run:\n{text}"
        );
    }
}
