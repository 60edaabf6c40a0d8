//! Attacks through the environment, against real agents: an operator
//! editing env keys that make hooks run code (`PYTHONWARNINGS`, `LD_PRELOAD`,
//! `BROWSER`, undeclared keys), hooks that would run as root, and the env
//! file read exactly as the real systemd reads it for a unit.

use std::path::Path;
use std::process::Command;

use covet_proto::v1 as pb;
use covet_tests::agent::TestAgent;
use covet_tests::sandbox::sandbox_or_skip;
use covet_tests::sandbox_dir;
use tonic::Code;

const ENV_FILE: &str =
    "# production\nDATABASE_URI=postgres://db/app\nexport SECRET_KEY='k'\nPYTHONWARNINGS=default\n";

fn set(key: &str, value: &str) -> pb::EnvEdit {
    pb::EnvEdit {
        edit: Some(pb::env_edit::Edit::Set(pb::EnvSet {
            key: key.into(),
            value: value.into(),
        })),
    }
}

fn rename(from: &str, to: &str) -> pb::EnvEdit {
    pb::EnvEdit {
        edit: Some(pb::env_edit::Edit::Rename(pb::EnvRename {
            from: from.into(),
            to: to.into(),
        })),
    }
}

fn unset(key: &str) -> pb::EnvEdit {
    pb::EnvEdit {
        edit: Some(pb::env_edit::Edit::Unset(pb::EnvUnset { key: key.into() })),
    }
}

fn app_toml(name: &str, env_file: &Path, env_keys: &str) -> String {
    format!(
        "\n[[app]]\nname = \"{name}\"\nunit = \"{name}.service\"\nenv_file = \"{}\"\nenv_keys = {env_keys}\n\
         [app.package]\nkind = \"pip\"\nname = \"covetpy\"\nvenv = \"/nonexistent/venv\"\n",
        env_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_edits_that_load_code_or_are_undeclared_are_refused_and_change_nothing() {
    let dir = sandbox_dir("sec-envkeys");
    std::fs::create_dir_all(dir.path()).unwrap();
    let declared_env = dir.path().join("declared.env");
    let open_env = dir.path().join("open.env");
    std::fs::write(&declared_env, ENV_FILE).unwrap();
    std::fs::write(&open_env, ENV_FILE).unwrap();
    let toml = format!(
        "{}{}",
        app_toml("declared", &declared_env, "[\"DATABASE_*\"]"),
        app_toml("open", &open_env, "[\"*\"]")
    );
    let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(agent.channel("operator").await);
    let attacks: Vec<(&str, Vec<pb::EnvEdit>, &str)> = vec![
        (
            "declared",
            vec![set("PYTHONWARNINGS", "ignore::x.Y")],
            "PYTHONWARNINGS",
        ),
        (
            "declared",
            vec![set("LD_PRELOAD", "/tmp/evil.so")],
            "LD_PRELOAD",
        ),
        ("declared", vec![set("BROWSER", "/tmp/evil")], "BROWSER"),
        ("declared", vec![set("SECRET_KEY", "x")], "SECRET_KEY"),
        (
            "declared",
            vec![set("DATABASE_URL", "ok"), set("BASH_ENV", "/tmp/x")],
            "BASH_ENV",
        ),
        (
            "declared",
            vec![rename("DATABASE_URI", "PYTHONPATH")],
            "PYTHONPATH",
        ),
        (
            "declared",
            vec![rename("PYTHONWARNINGS", "DATABASE_X")],
            "PYTHONWARNINGS",
        ),
        ("declared", vec![unset("PYTHONWARNINGS")], "PYTHONWARNINGS"),
        (
            "open",
            vec![set("LD_PRELOAD", "/tmp/evil.so")],
            "LD_PRELOAD",
        ),
        ("open", vec![set("PATH", "/tmp")], "PATH"),
        (
            "open",
            vec![set("NODE_OPTIONS", "--require /tmp/x")],
            "NODE_OPTIONS",
        ),
        ("open", vec![unset("PYTHONWARNINGS")], "PYTHONWARNINGS"),
        ("open", vec![rename("DATABASE_URI", "LD_AUDIT")], "LD_AUDIT"),
    ];
    for (app, edits, key) in attacks {
        let request = pb::UpgradeRequest {
            app: app.into(),
            to_version: "9.9.9".into(),
            env_edits: edits,
            ..Default::default()
        };
        for plan in [false, true] {
            let e = if plan {
                client.plan_upgrade(request.clone()).await.unwrap_err()
            } else {
                client.upgrade(request.clone()).await.unwrap_err()
            };
            assert_eq!(e.code(), Code::PermissionDenied, "{app} {key}: {e:?}");
            assert!(e.message().contains(key), "{key}: {}", e.message());
            assert!(e.message().contains("env_keys"), "{}", e.message());
        }
    }
    // Nothing changed and no operation was started.
    assert_eq!(std::fs::read_to_string(&declared_env).unwrap(), ENV_FILE);
    assert_eq!(std::fs::read_to_string(&open_env).unwrap(), ENV_FILE);
    let listed = agent.ctl("reader", &["-o", "json", "ops", "list"]);
    listed.assert_ok();
    assert!(!listed.stdout.contains("\"id\""), "{}", listed.stdout);

    // A declared key passes the key check (this app then fails for other reasons).
    let request = pb::UpgradeRequest {
        app: "declared".into(),
        to_version: "9.9.9".into(),
        env_edits: vec![
            set("DATABASE_URL", "postgres://new"),
            rename("DATABASE_URI", "DATABASE_OLD"),
        ],
        ..Default::default()
    };
    let e = client.plan_upgrade(request).await;
    assert!(
        e.as_ref().is_ok()
            || e.as_ref()
                .is_err_and(|e| e.code() != Code::PermissionDenied),
        "{e:?}"
    );
    // Malformed keys are INVALID_ARGUMENT, before any policy.
    let bad = pb::UpgradeRequest {
        app: "open".into(),
        to_version: "9.9.9".into(),
        env_edits: vec![set("A-B", "x")],
        ..Default::default()
    };
    let e = client.upgrade(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(std::fs::read_to_string(&open_env).unwrap(), ENV_FILE);

    // check-config: hooks without a user are refused unless explicitly allowed.
    let base = std::fs::read_to_string(&agent.config_path).unwrap();
    let hooks = "\n[[app]]\nname = \"hooked\"\nunit = \"hooked.service\"\n[app.migrate]\ncommand = [\"/bin/true\"]\n";
    let check = |extra: &str| {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, format!("{base}{hooks}{extra}")).unwrap();
        Command::new(covet_tests::bin("covet-agent"))
            .args(["check-config", "--config", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let refused = check("");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "{text}");
    assert!(
        text.contains(".user") && text.contains("run_hooks_as_root"),
        "{text}"
    );
    let said = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let allowed = check_with(&base, hooks, "run_hooks_as_root = true\n", dir.path());
    assert!(
        !said(&allowed).contains("hooks never run as root"),
        "{}",
        said(&allowed)
    );
    let with_user = check_with(&base, hooks, "user = \"nobody\"\n", dir.path());
    assert!(
        !said(&with_user).contains("hooks never run as root"),
        "{}",
        said(&with_user)
    );
    let declared_ld = base.replacen("env_keys = [\"*\"]", "env_keys = [\"LD_PRELOAD\"]", 1);
    let refused_ld = check_with(&declared_ld, "", "", dir.path());
    assert!(!refused_ld.status.success(), "{}", said(&refused_ld));
    assert!(
        said(&refused_ld).contains("env_keys[0]"),
        "{}",
        said(&refused_ld)
    );
}

/// check-config on `base` plus `hooks` with `extra` inserted after the app's `unit` line.
fn check_with(base: &str, hooks: &str, extra: &str, dir: &Path) -> std::process::Output {
    let hooks = hooks.replacen(
        "unit = \"hooked.service\"\n",
        &format!("unit = \"hooked.service\"\n{extra}"),
        1,
    );
    let path = dir.join("check2.toml");
    std::fs::write(&path, format!("{base}{hooks}")).unwrap();
    Command::new(covet_tests::bin("covet-agent"))
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap()
}

/// Tricky values, as they would be written by hand; `T_` marks the keys.
const TRICKY: &str = "T_PLAIN=plain\n  T_SPACED = spaced value   \nexport T_EXPORTED=no\n\
T_DQ=\"dq \\\" \\\\ \\$ \\` \\n \\a end\"\nT_SQ='sq \\n \"x\" \\\\'\n\
T_ESC=un\\ esc\\aped\\\\ # not a comment\nT_CONT=cont\\\ninued\nT_DQCONT=\"dq cont\\\ninued\"\n\
# comment \\\nT_SWALLOWED=1\n; semi\nT_EQ=has=equals=\nT_MIX='a'b\"c\"\nT_GAP= 'x' y\nT_NOEQ\n\
T_HASH=#hash\n1T_BAD=x\nT-DASH=y\nT_TWICE=first\nT_TWICE=second\nT_EMPTY=\nT_TRAIL=x\\ \n";

/// The env file as the real systemd gives it to a unit (`EnvironmentFile=`,
/// `env -0` to a file) equals what the agent's parser reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_file_values_match_what_systemd_gives_a_unit() {
    let dir = sandbox_dir("sec-envfile");
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    let env_file = dir.path().join("tricky.env");
    let dump = dir.path().join("dump.bin");
    std::fs::write(&env_file, TRICKY).unwrap();
    sandbox
        .install_unit(
            "envdump.service",
            &format!(
                "[Service]\nType=oneshot\nEnvironmentFile={}\nExecStart=/usr/bin/env -0\nStandardOutput=file:{}\n",
                env_file.display(),
                dump.display()
            ),
        )
        .unwrap();
    let started = sandbox.systemctl(&["start", "envdump.service"]);
    assert!(started.status.success(), "{started:?}");
    let systemd = tricky_vars(&std::fs::read(&dump).unwrap());
    let ours: Vec<(String, String)> = covet_agent::envfile::parse_values(TRICKY)
        .into_iter()
        .filter(|(k, _)| k.starts_with("T_"))
        .collect();
    let mut ours_sorted = ours.clone();
    ours_sorted.sort();
    assert_eq!(ours_sorted, systemd);
    // The cases this file is about are really there.
    for key in ["T_DQ", "T_CONT", "T_TRAIL", "T_EMPTY", "T_TWICE"] {
        assert!(systemd.iter().any(|(k, _)| k == key), "{key}: {systemd:?}");
    }
    for key in ["T_EXPORTED", "T_SWALLOWED", "T_NOEQ"] {
        assert!(!systemd.iter().any(|(k, _)| k == key), "{key}: {systemd:?}");
    }
}

/// The `T_` variables of an `env -0` dump, sorted.
fn tricky_vars(dump: &[u8]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = dump
        .split(|&b| b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (k, v) = entry.split_once('=')?;
            k.starts_with("T_").then(|| (k.to_owned(), v.to_owned()))
        })
        .collect();
    vars.sort();
    vars
}
