//! The sample app on MariaDB
//! (`DATABASE_URL=mysql://USER:PASS@/DB?unix_socket=…`, the app's own
//! stdlib client `covet/mywire.py`), and the agent's config for it: its
//! own account with a password in a defaults file.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::mariadb::MariaDb;
use crate::sampleapp::{self, BASE_VERSION, DB_NAME, DB_USER, SampleApp, check, toml_path};

/// The app's password (in its env file, as a URL part).
pub const APP_PASSWORD: &str = "app-pw";
/// The agent's account: every privilege (it creates and drops the restore
/// schemas), its password only in the defaults file.
pub const AGENT_USER: &str = "covet_agent";
pub const AGENT_PASSWORD: &str = "agent-pw";

/// The sample app at 0.1.9 on the server's database `covet_production`
/// (owned by `covet_app`, migrated, `rows` users), and the agent's defaults
/// file `root/agent.cnf`.
pub fn install(root: &Path, my: &MariaDb, rows: u32) -> anyhow::Result<(SampleApp, PathBuf)> {
    let root = std::path::absolute(root).context("app root")?;
    std::fs::create_dir_all(&root)?;
    my.create_db(DB_NAME, DB_USER, APP_PASSWORD)?;
    my.create_user(AGENT_USER, AGENT_PASSWORD, &["ALL PRIVILEGES ON *.*"])?;
    let defaults = root.join("agent.cnf");
    my.defaults_file(&defaults, AGENT_USER, AGENT_PASSWORD)?;
    let app = SampleApp {
        wheelhouse: sampleapp::build_wheelhouse(&root.join("wheelhouse"))?,
        venv: root.join("venv"),
        env_file: root.join("covet.env"),
        port: crate::try_free_port()?,
        db: DB_NAME.to_owned(),
        db_user: DB_USER.to_owned(),
        root,
    };
    sampleapp::make_venv(&app.venv, &app.wheelhouse, BASE_VERSION)?;
    std::fs::write(
        &app.env_file,
        format!(
            "# CovetPy 0.1.x settings (written by covet-tests)\nDATABASE_URI={}\n",
            database_url(my)
        ),
    )?;
    check(app.covet(&["migrate"])?, "covet migrate")?;
    if rows > 0 {
        my.sql(
            DB_NAME,
            &format!(
                "INSERT INTO users (email) SELECT CONCAT('user', seq, '@example.com') \
                 FROM seq_1_to_{rows}"
            ),
        )?;
    }
    Ok((app, defaults))
}

/// `mysql://covet_app:app-pw@/covet_production?unix_socket=SOCKET`.
pub fn database_url(my: &MariaDb) -> String {
    format!(
        "mysql://{DB_USER}:{APP_PASSWORD}@/{DB_NAME}?unix_socket={}",
        my.socket().display()
    )
}

/// The agent's `[[app]]` block for the app on MariaDB.
pub fn agent_toml(app: &SampleApp, defaults: &Path) -> String {
    app.agent_toml_with(&format!(
        "kind = \"mysql\"\ndbname = \"{DB_NAME}\"\ndefaults_file = {}",
        toml_path(defaults)
    ))
}
