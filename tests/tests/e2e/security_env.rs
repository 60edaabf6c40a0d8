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
    let ours: Vec<(String, String)> = covet_agent::host::envfile::parse_values(TRICKY)
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

/// A system user and group made for one test, removed after.
struct TestUser {
    name: String,
    group: String,
}

impl TestUser {
    fn create(tag: &str) -> Option<TestUser> {
        let suffix = std::process::id() % 100_000;
        let (name, group) = (format!("cv{tag}{suffix}"), format!("cv{tag}g{suffix}"));
        let ok = |args: &[&str], program: &str| {
            Command::new(program)
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&[&group], "/usr/sbin/groupadd") {
            eprintln!("skipped: groupadd failed (not root?)");
            return None;
        }
        let user = TestUser { name, group };
        if !ok(
            &[
                "-M",
                "-N",
                "-s",
                "/usr/sbin/nologin",
                "-G",
                &user.group,
                &user.name,
            ],
            "/usr/sbin/useradd",
        ) {
            return None;
        }
        Some(user)
    }

    fn id(&self, flag: &str) -> String {
        let out = Command::new("/usr/bin/id")
            .args([flag, &self.name])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/userdel").arg(&self.name).status();
        let _ = Command::new("/usr/sbin/groupdel").arg(&self.group).status();
    }
}

/// `upgrade --dry-run` of a venv owned by an unprivileged user: the scratch
/// venv is made and pip-installed by that user in a dir it owns, the hook
/// runs as the app's user with its supplementary groups and sees the env
/// file exactly as systemd reads it (edits applied), and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_runs_python_pip_and_hooks_as_their_users_with_the_unit_environment() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(user) = TestUser::create("env") else {
        return;
    };
    let dir = sandbox_dir("sec-dryrun");
    // The user must reach the app's files, as on a real host.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = dir.path().join("app");
    std::fs::create_dir_all(&root).unwrap();
    let wheelhouse = covet_tests::sampleapp::build_wheelhouse(&root.join("wheelhouse")).unwrap();
    let venv = root.join("venv");
    covet_tests::sampleapp::make_venv(&venv, &wheelhouse, "0.1.9").unwrap();
    let chown = Command::new("/bin/chown")
        .args(["-R", &user.name, venv.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(chown.success());
    let env_file = root.join("app.env");
    std::fs::write(&env_file, format!("DATABASE_URI=postgres://x\n{TRICKY}")).unwrap();
    // The hook reports who ran it, who owns the scratch venv pip filled, and its env.
    let hook = root.join("hook");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n/usr/bin/id -u\n/usr/bin/id -G\n\
             /usr/bin/stat -c %U {parent}/.covet-plan-*/venv/lib/python3*/site-packages/covetpy-0.2.0.dist-info/RECORD\n\
             /usr/bin/env -0 | /usr/bin/od -An -tx1 -v | /usr/bin/tr -d ' \\n'\n/bin/echo\n",
            parent = root.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let toml = format!(
        "\n[[app]]\nname = \"covet\"\nunit = \"covet.service\"\nuser = \"{user}\"\nenv_file = \"{env}\"\n\
         env_keys = [\"DATABASE_*\", \"T_*\"]\n[app.package]\nkind = \"pip\"\nname = \"covetpy\"\n\
         venv = \"{venv}\"\nfind_links = [\"{wheels}\"]\n[app.migrate]\ncommand = [\"/bin/true\"]\n\
         dry_run = [\"{hook}\"]\n",
        user = user.name,
        env = env_file.display(),
        venv = venv.display(),
        wheels = wheelhouse.display(),
        hook = hook.display(),
    );
    let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;
    let env_before = std::fs::read(&env_file).unwrap();
    // Through covetctl, as an operator would, with room for a scratch venv.
    let out = agent.ctl(
        "operator",
        &[
            "-o",
            "json",
            "--timeout",
            "120s",
            "upgrade",
            "covet",
            "--to",
            "0.2.0",
            "--dry-run",
            "--env-rename",
            "DATABASE_URI=DATABASE_URL",
            "--env-set",
            "T_NEW=a b",
        ],
    );
    let plan = out.json();
    let lines: Vec<String> = plan["migration_dry_run"]
        .as_array()
        .unwrap_or_else(|| panic!("{}\n{}", out.stdout, out.stderr))
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    let blockers = plan["blockers"].to_string();
    assert!(!blockers.contains("dry run"), "{blockers}\n{}", agent.log());
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0], user.id("-u"), "the hook ran as the app's user");
    assert_eq!(lines[1], user.id("-G"), "with the user's groups");
    assert!(lines[1].split(' ').count() >= 2, "{lines:?}");
    assert_eq!(lines[2], user.name, "pip ran as the venv's owner");
    let bytes: Vec<u8> = (0..lines[3].len() / 2)
        .map(|i| u8::from_str_radix(&lines[3][2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let seen = tricky_vars(&bytes);
    let mut want: Vec<(String, String)> = covet_agent::host::envfile::parse_values(TRICKY)
        .into_iter()
        .filter(|(k, _)| k.starts_with("T_"))
        .chain([("T_NEW".to_owned(), "a b".to_owned())])
        .collect();
    want.sort();
    assert_eq!(seen, want);
    let dump = String::from_utf8_lossy(&bytes);
    assert!(dump.contains("DATABASE_URL=postgres://x\0"), "{dump:?}");
    // Nothing left: no scratch dir, the env file and the venv untouched.
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".covet-plan-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(std::fs::read(&env_file).unwrap(), env_before);
    assert_eq!(std::fs::metadata(&venv).unwrap().uid(), user_uid(&user));
}

fn user_uid(user: &TestUser) -> u32 {
    user.id("-u").parse().unwrap()
}
