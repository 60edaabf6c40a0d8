//! Shell completions and the man page, generated from the clap definition at
//! package time (`covetctl generate-assets DIR`, a hidden command).

use std::fs;
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory;
use clap_complete::Shell;

/// Writes `covetctl.bash`, `_covetctl` (zsh), `covetctl.fish` and `covetctl.1` into `dir`.
pub fn generate<C: CommandFactory>(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut cmd = C::command();
    let name = cmd.get_name().to_owned();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, &name, dir)
            .with_context(|| format!("write {shell} completions into {}", dir.display()))?;
        println!("{}", path.display());
    }
    let page = dir.join(format!("{name}.1"));
    let mut roff = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut roff)
        .context("render the man page")?;
    fs::write(&page, roff).with_context(|| format!("write {}", page.display()))?;
    println!("{}", page.display());
    Ok(())
}
