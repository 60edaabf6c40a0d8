//! The sample app on SQLite (`DATABASE_URL=sqlite:///…`), and Python's
//! stdlib `sqlite3` as the tests' client: queries, and a writer process that
//! inserts in a loop (WAL mode) while the agent backs the file up.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::sampleapp::{self, BASE_VERSION, SampleApp, check, python, run_bounded, toml_path};

const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one statement (or, with `script`, several) and prints the rows.
const QUERY_PY: &str = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
if sys.argv[3] == "script":
    c.executescript(sys.argv[2])
else:
    for r in c.execute(sys.argv[2]):
        print("|".join("" if v is None else str(v) for v in r))
"#;

/// Inserts batches of 50 rows into `events` for argv[2] seconds, WAL mode;
/// prints "ready" once the table exists and the row count at the end.
const WRITER_PY: &str = r#"
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
c.execute("PRAGMA journal_mode = WAL")
c.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
print("ready", flush=True)
end = time.time() + float(sys.argv[2])
n = 0
while time.time() < end:
    c.execute("BEGIN")
    for _ in range(50):
        c.execute("INSERT INTO events (payload) VALUES (?)", ("x" * 200,))
    c.execute("COMMIT")
    n += 50
print(n, flush=True)
"#;

/// Rows of `sql` on the database file, one line each, columns joined by `|`.
pub fn query(db: &Path, sql: &str) -> anyhow::Result<String> {
    run(db, sql, "query")
}

/// Runs several statements (`executescript`).
pub fn script(db: &Path, sql: &str) -> anyhow::Result<()> {
    run(db, sql, "script").map(drop)
}

fn run(db: &Path, sql: &str, mode: &str) -> anyhow::Result<String> {
    let mut cmd = python();
    cmd.args(["-c", QUERY_PY]).arg(db).args([sql, mode]);
    let out = check(run_bounded(&mut cmd, QUERY_TIMEOUT)?, "sqlite3 query")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process inserting rows into the `events` table; see [`Writer::start`].
pub struct Writer {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Writer {
    /// Starts the writer for `seconds` and waits until its table exists.
    pub fn start(db: &Path, seconds: f64) -> anyhow::Result<Writer> {
        let mut child = python()
            .args(["-c", WRITER_PY])
            .arg(db)
            .arg(seconds.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the sqlite writer")?;
        let mut stdout = BufReader::new(child.stdout.take().context("writer stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        anyhow::ensure!(line.trim() == "ready", "writer said {line:?}");
        Ok(Writer { child, stdout })
    }

    /// Waits for the writer's end; the rows it inserted.
    pub fn finish(mut self) -> anyhow::Result<u64> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "writer failed: {status}");
        line.trim().parse().context("writer's count")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sample app at 0.1.9 on SQLite: like [`sampleapp::install`], with
/// the database file `root/data/covet.db` (migrated, `rows` users).
pub fn install(root: &Path, rows: u32) -> anyhow::Result<(SampleApp, PathBuf)> {
    let root = std::path::absolute(root).context("app root")?;
    std::fs::create_dir_all(root.join("data"))?;
    let db = root.join("data/covet.db");
    let app = SampleApp {
        wheelhouse: sampleapp::build_wheelhouse(&root.join("wheelhouse"))?,
        venv: root.join("venv"),
        env_file: root.join("covet.env"),
        port: crate::try_free_port()?,
        db: db.display().to_string(),
        db_user: String::new(),
        root,
    };
    sampleapp::make_venv(&app.venv, &app.wheelhouse, BASE_VERSION)?;
    std::fs::write(
        &app.env_file,
        format!(
            "# CovetPy 0.1.x settings (written by covet-tests)\nDATABASE_URI=sqlite://{}\n",
            db.display()
        ),
    )?;
    check(app.covet(&["migrate"])?, "covet migrate")?;
    script(
        &db,
        &format!(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {rows}) \
             INSERT INTO users (email) SELECT 'user' || n || '@example.com' FROM g WHERE {rows} > 0;"
        ),
    )?;
    Ok((app, db))
}

/// The agent's `[[app]]` block for the app on SQLite.
pub fn agent_toml(app: &SampleApp, db: &Path) -> String {
    app.agent_toml_with(&format!("kind = \"sqlite\"\npath = {}", toml_path(db)))
}
