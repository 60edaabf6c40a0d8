//! `covet-bench-backup`: the backup engine against the tools an operator
//! would use by hand, measured side by side in one run:
//!
//! - files: our gzip mode vs `tar -czf`, our zstd mode vs `tar -I 'zstd -T0'`
//!   (time and size), our restore vs `tar -xzf`;
//! - venv: restoring a virtualenv-sized tree (a real `python3 -m venv` with
//!   pip, about 22 MB in 1,700 files, or a synthetic one) vs `tar -I zstd
//!   -xf` followed by `sync -f`, on the same archive, into empty directories;
//! - database: our dump (`pg_dump -Fc -Z0` into multi-threaded zstd) vs bare
//!   `pg_dump -Fc`, on a pgbench database and on poorly compressible rows;
//! - concurrent: a backup of files and the pgbench database, archiving and
//!   dumping at once, vs the sum of a files-only and a database-only backup;
//! - mysql: our MariaDB dump (`mariadb-dump --single-transaction` into
//!   multi-threaded zstd, rows counted on the way) vs `mariadb-dump > file`,
//!   `mariadb-dump | gzip` and `mariadb-dump | zstd -T0`, on `--mysql-mb`
//!   MiB of pgbench-like rows.
//!
//! Sizes: `--tree-mb 1024 --files 40000 --pgbench-scale 50 --random-mb 256
//! --mysql-mb 1024` (the defaults); smaller values for a quick run. `--only
//! venv,concurrent` runs only the named sections (files, venv, db,
//! concurrent, mysql).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use covet_agent::archive::{self, Compression, Progress};
use covet_agent::backup::{BackupStore, CreateOptions};
use covet_agent::config::AppConfig;
use covet_agent::db::{self, ClientPrograms, Kind, MysqlTarget, PgTarget};
use covet_agent::files::safe::Dir;
use covet_agent::ops::log::{Caller, OpKind, OpLog};
use covet_agent::ops::{OpSpec, Operations};
use covet_tests::mariadb::MariaDb;
use covet_tests::postgres::PostgresCluster;

struct Args {
    tree_mb: u64,
    files: u64,
    pgbench_scale: u32,
    random_mb: u64,
    mysql_mb: u64,
    only: Option<Vec<String>>,
}

impl Args {
    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == section))
    }
}

const SECTIONS: [&str; 5] = ["files", "venv", "db", "concurrent", "mysql"];

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        tree_mb: 1024,
        files: 40_000,
        pgbench_scale: 50,
        random_mb: 256,
        mysql_mb: 1024,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--tree-mb" => a.tree_mb = value.parse()?,
            "--files" => a.files = value.parse()?,
            "--pgbench-scale" => a.pgbench_scale = value.parse()?,
            "--random-mb" => a.random_mb = value.parse()?,
            "--mysql-mb" => a.mysql_mb = value.parse()?,
            "--only" => {
                let only: Vec<String> = value.split(',').map(str::to_owned).collect();
                if let Some(bad) = only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    anyhow::bail!("unknown section {bad}: the sections are {SECTIONS:?}");
                }
                a.only = Some(only);
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// A deterministic pseudo-random stream (xorshift), so runs compare.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// A source tree like an app and its venv: mostly text (Python sources),
/// some binary blobs, many small files.
fn generate_tree(root: &Path, total_mb: u64, files: u64) -> anyhow::Result<()> {
    let per_file = (total_mb << 20) / files.max(1);
    let text_line =
        "def handler(request):\n    return {'status': 'ok', 'items': [1, 2, 3]}  # covet\n";
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    for i in 0..files {
        let dir = root.join(format!("pkg{:03}/mod{:02}", i % 400, i % 37));
        std::fs::create_dir_all(&dir)?;
        let mut content = Vec::with_capacity(per_file as usize);
        if i % 5 == 0 {
            content.resize(per_file as usize, 0);
            noise.fill(&mut content);
        } else {
            while (content.len() as u64) < per_file {
                content.extend_from_slice(format!("{i} ").as_bytes());
                content.extend_from_slice(text_line.as_bytes());
            }
            content.truncate(per_file as usize);
        }
        std::fs::write(dir.join(format!("f{i}.py")), content)?;
    }
    Ok(())
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Duration)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed()))
}

fn run_tool(program: &str, args: &[&str], cwd: &Path) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .status()
        .with_context(|| format!("run {program}"))?;
    ensure!(status.success(), "{program} {args:?} failed");
    Ok(())
}

fn drop_caches() {
    // Best effort: make runs comparable by starting cold where allowed.
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn row(what: &str, ours: Duration, peer: Duration, ours_size: u64, peer_size: u64) {
    println!(
        "{:<36} {:>8.2}s {:>8.2}s {:>6.2}x   {:>8.1} MiB {:>8.1} MiB",
        what,
        ours.as_secs_f64(),
        peer.as_secs_f64(),
        peer.as_secs_f64() / ours.as_secs_f64(),
        ours_size as f64 / 1048576.0,
        peer_size as f64 / 1048576.0
    );
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("covet-bench-backup-")
        .tempdir_in("/var/tmp")?;
    let root = dir.path();
    let tree = root.join("app");
    println!(
        "generating a {} MiB tree of {} files...",
        args.tree_mb, args.files
    );
    generate_tree(&tree, args.tree_mb, args.files)?;
    if args.wants("files") {
        files_rows(root, &tree)?;
    }
    if args.wants("venv") {
        venv_row(root)?;
    }
    if args.wants("mysql") {
        mysql_rows(root, args.mysql_mb).await?;
    }
    if !args.wants("db") && !args.wants("concurrent") {
        return Ok(());
    }
    println!("\nstarting a PostgreSQL cluster...");
    let pg = PostgresCluster::start(&root.join("pg"))?;
    let bindir = PgTarget::discover_bindir()?;
    pg.psql("postgres", "CREATE DATABASE bench")?;
    println!("pgbench -i -s {} ...", args.pgbench_scale);
    let status = Command::new(bindir.join("pgbench"))
        .args(["-q", "-i", "-s", &args.pgbench_scale.to_string(), "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres", "bench"])
        .status()?;
    ensure!(status.success(), "pgbench -i failed");
    if args.wants("concurrent") {
        concurrent_row(root, &tree, &pg).await?;
    }
    std::fs::remove_dir_all(&tree)?;
    if args.wants("db") {
        db_rows(root, &pg, &bindir, args.random_mb).await?;
    }
    println!(
        "\ntargets: gzip >= 1.8x tar -czf at <= size; zstd within 10% of tar+zstd; db never slower than pg_dump -Fc, >= 3x on noise; mysql never slower than mariadb-dump > file, >= 3x its gzip pipeline; venv restore within 1.2x of tar (speedup >= 0.83); concurrent faster than the sum"
    );
    Ok(())
}

fn files_rows(root: &Path, tree: &Path) -> anyhow::Result<()> {
    let silent = Progress::silent();
    println!(
        "\n{:<36} {:>9} {:>9} {:>7}   {:>12} {:>12}",
        "files (speedup = peer time / ours)", "covet", "peer", "speedup", "covet size", "peer size"
    );

    drop_caches();
    let ours_gz = root.join("ours.tar.gz");
    let (_, t_ours) = timed(|| Ok(archive::create(tree, &ours_gz, Compression::Gzip, &silent)?))?;
    drop_caches();
    let (_, t_peer) = timed(|| run_tool("tar", &["-czf", "peer.tar.gz", "app"], root))?;
    row(
        "backup gzip vs tar -czf",
        t_ours,
        t_peer,
        size(&ours_gz),
        size(&root.join("peer.tar.gz")),
    );

    drop_caches();
    let ours_zst = root.join("ours.tar.zst");
    let (_, t_ours) = timed(|| {
        Ok(archive::create(
            tree,
            &ours_zst,
            Compression::Zstd,
            &silent,
        )?)
    })?;
    drop_caches();
    let (_, t_peer) = timed(|| {
        run_tool(
            "tar",
            &["-I", "zstd -T0", "-cf", "peer.tar.zst", "app"],
            root,
        )
    })?;
    row(
        "backup zstd vs tar -I 'zstd -T0'",
        t_ours,
        t_peer,
        size(&ours_zst),
        size(&root.join("peer.tar.zst")),
    );

    let staging = root.join("restore-ours");
    std::fs::create_dir(&staging)?;
    drop_caches();
    let (_, t_ours) = timed(|| {
        Ok(archive::extract(
            &ours_gz,
            Compression::Gzip,
            &staging,
            &silent,
        )?)
    })?;
    let peer_dir = root.join("restore-peer");
    std::fs::create_dir(&peer_dir)?;
    drop_caches();
    let (_, t_peer) = timed(|| run_tool("tar", &["-xzf", "../peer.tar.gz"], &peer_dir))?;
    row("restore gzip vs tar -xzf", t_ours, t_peer, 0, 0);
    std::fs::remove_dir_all(&staging)?;
    std::fs::remove_dir_all(&peer_dir)?;
    for f in ["ours.tar.gz", "ours.tar.zst", "peer.tar.gz", "peer.tar.zst"] {
        std::fs::remove_file(root.join(f))?;
    }
    Ok(())
}

/// A virtualenv to restore: a real one (`python3 -m venv`, which installs
/// pip: about 22 MB in 1,700 files) where Python can make it, else a
/// synthetic tree of that size.
fn make_venv(dest: &Path) -> anyhow::Result<String> {
    let made = Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(dest)
        .status()
        .is_ok_and(|s| s.success());
    if made {
        return Ok("python3 -m venv".to_owned());
    }
    let _ = std::fs::remove_dir_all(dest);
    generate_tree(dest, 22, 1_700)?;
    Ok("synthetic".to_owned())
}

/// The best of several runs: on a shared machine the least disturbed one.
fn best(times: &[Duration]) -> Duration {
    times.iter().copied().min().unwrap_or_default()
}

/// Restores of a venv-sized tree from one archive, ours (extraction with
/// its final sync) and `tar -I zstd -xf` + `sync -f`, alternating, best of
/// 5, each into a new empty directory after a `sync`.
fn venv_row(root: &Path) -> anyhow::Result<()> {
    let venv = root.join("venv");
    let kind = make_venv(&venv)?;
    let measured = archive::measure(&venv)?;
    let archive_path = root.join("venv.tar.zst");
    archive::create(&venv, &archive_path, Compression::Zstd, &Progress::silent())?;
    println!(
        "\nvenv ({kind}): {} entries, {:.1} MiB, archive {:.1} MiB",
        measured.files,
        measured.uncompressed_bytes as f64 / 1048576.0,
        size(&archive_path) as f64 / 1048576.0
    );
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let into = root.join(format!("venv-ours-{i}"));
        std::fs::create_dir(&into)?;
        let _ = Command::new("sync").status();
        // As a restore does: the manifest's recorded size is the budget.
        let options = archive::ExtractOptions {
            owner: None,
            known_size: Some(measured.uncompressed_bytes),
        };
        let (_, t) = timed(|| {
            let dir = Dir::open(&into)?;
            Ok(archive::extract_into(
                &archive_path,
                Compression::Zstd,
                &dir,
                &into,
                options,
                &Progress::silent(),
            )?)
        })?;
        ours.push(t);
        let into_peer = root.join(format!("venv-peer-{i}"));
        std::fs::create_dir(&into_peer)?;
        let _ = Command::new("sync").status();
        let archive_arg = archive_path.display().to_string();
        let (_, t) = timed(|| {
            run_tool("tar", &["-I", "zstd", "-xf", &archive_arg], &into_peer)?;
            run_tool("sync", &["-f", "."], &into_peer)
        })?;
        peer.push(t);
        std::fs::remove_dir_all(&into)?;
        std::fs::remove_dir_all(&into_peer)?;
    }
    row(
        "restore venv vs tar -I zstd -xf+sync",
        best(&ours),
        best(&peer),
        0,
        0,
    );
    std::fs::remove_dir_all(&venv)?;
    Ok(())
}

/// A backup of the tree, a venv and the pgbench database through the
/// agent's own backup store: archiving and dumping at once, against the
/// sum of a files-only and a database-only backup of the same.
async fn concurrent_row(root: &Path, tree: &Path, pg: &PostgresCluster) -> anyhow::Result<()> {
    let venv = root.join("venv-for-backup");
    make_venv(&venv)?;
    let app: AppConfig = serde_json::from_value(serde_json::json!({
        "name": "bench",
        "unit": "bench.service",
        "paths": [tree, venv],
        "database": {
            "kind": "postgres",
            "dbname": "bench",
            "host": pg.socket_dir(),
            "port": pg.port(),
            "user": "postgres",
            "os_user": "postgres",
        },
    }))?;
    let ops = Operations::new(std::sync::Arc::new(OpLog::open(
        &root.join("journal.redb"),
    )?));
    let store = BackupStore::new(root.join("backups"));
    let backup = async |files: bool, database: bool| -> anyhow::Result<Duration> {
        let op = ops.begin_inline(OpSpec {
            kind: OpKind::BackupCreate,
            app: app.name.clone(),
            caller: Caller::default(),
            params: Default::default(),
            exclusive: true,
        })?;
        let opts = CreateOptions {
            files,
            database,
            compression: Compression::Zstd,
        };
        drop_caches();
        let t = Instant::now();
        store.create(op.ctx(), &app, opts, 0).await?;
        Ok(t.elapsed())
    };
    let files_only = backup(true, false).await?;
    let database_only = backup(false, true).await?;
    let both = backup(true, true).await?;
    println!(
        "\n{:<36} {:>9} {:>9} {:>7}",
        "backup files + db", "at once", "sum", "speedup"
    );
    println!(
        "(files alone {:.2}s, database alone {:.2}s)",
        files_only.as_secs_f64(),
        database_only.as_secs_f64()
    );
    row(
        "files+db concurrent vs sequential",
        both,
        files_only + database_only,
        0,
        0,
    );
    std::fs::remove_dir_all(&venv)?;
    std::fs::remove_dir_all(root.join("backups"))?;
    Ok(())
}

async fn db_rows(
    root: &Path,
    pg: &PostgresCluster,
    bindir: &Path,
    random_mb: u64,
) -> anyhow::Result<()> {
    pg.psql("postgres", "CREATE DATABASE noise")?;
    println!("{random_mb} MiB of poorly compressible rows ...");
    let rows = random_mb * 1024; // 1 KiB of random text per row
    pg.psql(
        "noise",
        &format!(
            "CREATE TABLE blobs AS SELECT g AS id, \
             (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 32) i) AS body \
             FROM generate_series(1, {rows}) g"
        ),
    )?;
    println!(
        "\n{:<36} {:>9} {:>9} {:>7}   {:>12} {:>12}",
        "database (speedup = peer time / ours)",
        "covet",
        "pg_dump",
        "speedup",
        "covet size",
        "peer size"
    );
    for dbname in ["bench", "noise"] {
        let target = PgTarget {
            dbname: dbname.into(),
            host: Some(pg.socket_dir().display().to_string()),
            port: Some(pg.port()),
            user: Some("postgres".into()),
            os_user: Some("postgres".into()),
            bindir: bindir.to_path_buf(),
        };
        let ours = root.join(format!("{dbname}.dump.zst"));
        let never = std::sync::atomic::AtomicBool::new(false);
        let t = Instant::now();
        db::dump(&target, &ours, Duration::from_secs(3600), &|_| {}, &never).await?;
        let t_ours = t.elapsed();
        let peer: PathBuf = root.join(format!("{dbname}.pgdump"));
        let t = Instant::now();
        let status = Command::new(bindir.join("pg_dump"))
            .args(["-Fc", "-h"])
            .arg(pg.socket_dir())
            .args(["-p", &pg.port().to_string(), "-U", "postgres", "-f"])
            .arg(&peer)
            .arg(dbname)
            .status()?;
        ensure!(status.success(), "pg_dump failed");
        let t_peer = t.elapsed();
        row(
            &format!("db {dbname} vs pg_dump -Fc"),
            t_ours,
            t_peer,
            size(&ours),
            size(&peer),
        );
    }
    Ok(())
}

/// Our MariaDB dump against mariadb-dump alone and piped into gzip and
/// zstd -T0, on `mb` MiB of pgbench_accounts-like rows.
async fn mysql_rows(root: &Path, mb: u64) -> anyhow::Result<()> {
    println!("\nstarting a MariaDB server...");
    // The mysql user must get through to its directory.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root)?.permissions().mode();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode | 0o001))?;
    let my = MariaDb::start(&root.join("my"))?;
    // pgbench_accounts' shape: about 100 bytes a row in the dump.
    let rows = mb * 1024 * 1024 / 100;
    println!("{rows} rows (about {mb} MiB of dump) ...");
    my.sql(
        "",
        "CREATE DATABASE bench; CREATE TABLE bench.accounts (aid INT PRIMARY KEY, \
         bid INT NOT NULL, abalance INT NOT NULL, filler CHAR(84)) ENGINE=InnoDB",
    )?;
    let chunk = 1_000_000;
    let mut from = 1;
    while from <= rows {
        let to = (from + chunk - 1).min(rows);
        my.sql(
            "bench",
            &format!(
                "INSERT INTO accounts SELECT seq, seq DIV 100000, seq % 9973, \
                 LPAD(seq, 84, ' ') FROM seq_{from}_to_{to}"
            ),
        )?;
        from = to + 1;
    }
    let target = MysqlTarget {
        dbname: "bench".into(),
        socket: Some(my.socket()),
        host: None,
        port: None,
        user: Some("root".into()),
        defaults_file: None,
        os_user: None,
        programs: ClientPrograms::discover()?,
    };
    let dump_cmd = || {
        let mut c = Command::new(target.programs.bindir.join(target.programs.dump));
        c.arg("--no-defaults")
            .arg(format!("--socket={}", my.socket().display()))
            .args([
                "--user=root",
                "--single-transaction",
                "--routines",
                "--triggers",
                "--events",
                "--hex-blob",
                "--default-character-set=utf8mb4",
                "bench",
            ]);
        c
    };
    let piped = |compressor: Option<&[&str]>, out: &Path| -> anyhow::Result<Duration> {
        drop_caches();
        let file = std::fs::File::create(out)?;
        let t = Instant::now();
        match compressor {
            None => {
                let status = dump_cmd().stdout(file).status()?;
                ensure!(status.success(), "mariadb-dump failed");
            }
            Some(argv) => {
                let mut dump = dump_cmd().stdout(std::process::Stdio::piped()).spawn()?;
                let stdout = dump.stdout.take().context("dump stdout")?;
                let status = Command::new(argv[0])
                    .args(&argv[1..])
                    .stdin(stdout)
                    .stdout(file)
                    .status()?;
                ensure!(
                    dump.wait()?.success() && status.success(),
                    "{argv:?} pipeline failed"
                );
            }
        }
        Ok(t.elapsed())
    };
    println!(
        "\n{:<36} {:>9} {:>9} {:>7}   {:>12} {:>12}",
        "mysql (speedup = peer time / ours)", "covet", "peer", "speedup", "covet size", "peer size"
    );
    drop_caches();
    let ours = root.join("bench.sql.zst");
    let never = std::sync::atomic::AtomicBool::new(false);
    let t = Instant::now();
    let dumped = target
        .dump(&ours, Duration::from_secs(3600), &|_| {}, &never)
        .await?;
    let t_ours = t.elapsed();
    ensure!(
        dumped.row_counts.get("accounts") == Some(&rows),
        "row count {:?}",
        dumped.row_counts
    );
    for (what, compressor, name) in [
        ("vs mariadb-dump > file", None, "bench.sql"),
        (
            "vs mariadb-dump | gzip",
            Some(&["gzip", "-c"][..]),
            "bench.sql.gz",
        ),
        (
            "vs mariadb-dump | zstd -T0",
            Some(&["zstd", "-q", "-T0", "-c"][..]),
            "bench.peer.zst",
        ),
    ] {
        let out = root.join(name);
        let t_peer = piped(compressor, &out)?;
        row(what, t_ours, t_peer, size(&ours), size(&out));
        std::fs::remove_file(&out)?;
    }
    std::fs::remove_file(&ours)?;
    Ok(())
}
