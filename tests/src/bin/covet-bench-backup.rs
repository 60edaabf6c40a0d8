//! `covet-bench-backup`: the backup engine against the tools an operator
//! would use by hand, measured side by side in one run:
//!
//! - files: our gzip mode vs `tar -czf`, our zstd mode vs `tar -I 'zstd -T0'`
//!   (time and size), our restore vs `tar -xzf`;
//! - database: our dump (`pg_dump -Fc -Z0` into multi-threaded zstd) vs bare
//!   `pg_dump -Fc`, on a pgbench database and on poorly compressible rows.
//!
//! Sizes: `--tree-mb 1024 --files 40000 --pgbench-scale 50 --random-mb 256`
//! (the defaults); smaller values for a quick run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use covet_agent::backup::archive::{self, Compression, Progress};
use covet_agent::db::{self, PgTarget};
use covet_tests::postgres::PostgresCluster;

struct Args {
    tree_mb: u64,
    files: u64,
    pgbench_scale: u32,
    random_mb: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        tree_mb: 1024,
        files: 40_000,
        pgbench_scale: 50,
        random_mb: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--tree-mb" => a.tree_mb = value.parse()?,
            "--files" => a.files = value.parse()?,
            "--pgbench-scale" => a.pgbench_scale = value.parse()?,
            "--random-mb" => a.random_mb = value.parse()?,
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
    let silent = Progress::silent();
    println!(
        "\n{:<36} {:>9} {:>9} {:>7}   {:>12} {:>12}",
        "files (speedup = peer time / ours)", "covet", "peer", "speedup", "covet size", "peer size"
    );

    drop_caches();
    let ours_gz = root.join("ours.tar.gz");
    let (_, t_ours) = timed(|| {
        Ok(archive::create(
            &tree,
            &ours_gz,
            Compression::Gzip,
            &silent,
        )?)
    })?;
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
            &tree,
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
    std::fs::remove_dir_all(&tree)?;

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
    pg.psql("postgres", "CREATE DATABASE noise")?;
    println!("{} MiB of poorly compressible rows ...", args.random_mb);
    let rows = args.random_mb * 1024; // 1 KiB of random text per row
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
            bindir: bindir.clone(),
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
    println!(
        "\ntargets: gzip >= 1.8x tar -czf at <= size; zstd within 10% of tar+zstd; db never slower than pg_dump -Fc, >= 3x on noise"
    );
    Ok(())
}
