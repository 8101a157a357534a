//! The parent/child line protocol every multi-process scenario uses: the parent starts a child
//! process of this binary, reads `TAG rest` lines from its stdout and writes words (`GO`, `STOP`)
//! to its stdin; the child waits for those words with `wait_for_word`.

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout, Command};

/// A child process of this binary (killed when dropped).
pub struct Child {
    _process: tokio::process::Child,
    /// For error messages: "worker 1", "__floor-server".
    name: String,
    pub pid: u32,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Child {
    /// Starts `<this binary> <command> <argv..>`.
    pub fn spawned(name: String, command: &str, argv: Vec<String>) -> Result<Child> {
        let exe = std::env::current_exe()?;
        let mut process = Command::new(exe)
            .arg(command)
            .args(argv)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let pid = process.id().ok_or_else(|| anyhow!("{name} has no pid"))?;
        let stdin = process
            .stdin
            .take()
            .ok_or_else(|| anyhow!("{name}: stdin"))?;
        let stdout = process
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}: stdout"))?;
        Ok(Child {
            _process: process,
            name,
            pid,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// What follows `tag` on the first line whose first word is `tag` (lines before it are
    /// skipped), if it comes before `deadline`.
    pub async fn expect(&mut self, tag: &str, deadline: Instant) -> Result<String> {
        loop {
            let line = tokio::time::timeout_at(deadline.into(), self.lines.next_line())
                .await
                .map_err(|_| anyhow!("{} did not report {tag} in time", self.name))??
                .ok_or_else(|| anyhow!("{} exited before {tag}", self.name))?;
            if let Some(rest) = line.strip_prefix(tag) {
                if rest.is_empty() || rest.starts_with(' ') {
                    return Ok(rest.trim_start().to_owned());
                }
            }
        }
    }

    /// Writes `word` and a newline to the child's stdin.
    pub async fn say(&mut self, word: &str) -> Result<()> {
        self.stdin.write_all(format!("{word}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }
}

/// In a child: returns once the parent has written `word` on a line of its own.
pub async fn wait_for_word(word: &str) -> Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        match stdin.next_line().await? {
            Some(line) if line.trim() == word => return Ok(()),
            Some(_) => continue,
            None => bail!("parent went away before {word}"),
        }
    }
}
