//! Starting `loraplex serve` as a child process on a free port (for `bench-serve` without
//! `--url`), and writing the synthetic adapters it serves.

use crate::lora::synthetic::write_synthetic_adapter;
use crate::model::{LlamaConfig, Proj};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server this process started; killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub url: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    /// Runs this executable as `serve --host 127.0.0.1 --port 0 ARGS...` and waits (up to
    /// `wait`) for its "listening on" line.
    pub fn start(args: &[String], wait: Duration) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the loraplex executable")?;
        let mut child = Command::new(exe)
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start `loraplex serve`")?;
        let stdout = child.stdout.take().context("no stdout from the server")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let url = rest.split_whitespace().next().unwrap_or("").to_string();
                        sent = tx.send(url).is_ok();
                    }
                }
                // Keep draining so the server never blocks on a full pipe.
            }
        });
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(url) = rx.recv_timeout(Duration::from_millis(200)) {
                return Ok(Self { child, url });
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "`loraplex serve` exited before listening ({status}); run it alone to see why"
                );
            }
            if Instant::now() > deadline {
                bail!("`loraplex serve` did not start listening within {wait:?}");
            }
        }
    }
}

/// A family of synthetic adapters: rank and target modules.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraShape {
    pub rank: usize,
    pub targets: Vec<Proj>,
}

impl LoraShape {
    /// `r8:q_proj+v_proj`, `16:all-linear`, `r16:q+k+v+o`.
    pub fn parse(s: &str) -> Result<Self> {
        let (r, t) = s
            .split_once(':')
            .with_context(|| format!("`{s}`: expected RANK:TARGETS, e.g. 8:q_proj+v_proj"))?;
        let rank: usize = r
            .trim_start_matches('r')
            .parse()
            .with_context(|| format!("`{r}` is not a rank"))?;
        if rank == 0 {
            bail!("the rank must be at least 1");
        }
        let targets = if t == "all-linear" {
            Proj::ALL.to_vec()
        } else {
            let mut out = Vec::new();
            for n in t.split('+') {
                let full = if n.ends_with("_proj") {
                    n.to_string()
                } else {
                    format!("{n}_proj")
                };
                match Proj::from_name(&full) {
                    Some(p) if !out.contains(&p) => out.push(p),
                    Some(_) => {}
                    None => bail!("unknown target module `{n}` in `{s}`"),
                }
            }
            out
        };
        Ok(Self { rank, targets })
    }

    /// `r8 q,v` / `r16 all-linear`.
    pub fn label(&self) -> String {
        if self.targets.len() == Proj::ALL.len() {
            return format!("r{} all-linear", self.rank);
        }
        let names: Vec<&str> = self
            .targets
            .iter()
            .map(|p| p.name().trim_end_matches("_proj"))
            .collect();
        format!("r{} {}", self.rank, names.join(","))
    }

    /// Folder-safe tag: `r8-q-v`.
    pub fn tag(&self) -> String {
        self.label().replace([' ', ','], "-")
    }
}

/// Writes `n` distinct synthetic adapters of `shape` for `cfg` under `dir` and returns their
/// names (`bench-<tag>-<i>`).
pub fn write_adapters(
    dir: &Path,
    cfg: &LlamaConfig,
    shape: &LoraShape,
    n: usize,
) -> Result<Vec<String>> {
    (0..n)
        .map(|i| {
            let name = format!("bench-{}-{i}", shape.tag());
            write_synthetic_adapter(
                &dir.join(&name),
                cfg,
                shape.rank,
                &shape.targets,
                0.37 + i as f64,
                0.02,
            )?;
            Ok(name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_shapes_parse() {
        let s = LoraShape::parse("r8:q_proj+v_proj").unwrap();
        assert_eq!((s.rank, s.targets.len()), (8, 2));
        assert_eq!(s.label(), "r8 q,v");
        assert_eq!(s.tag(), "r8-q-v");
        assert_eq!(LoraShape::parse("16:all-linear").unwrap().targets.len(), 7);
        assert_eq!(LoraShape::parse("4:q+k+q").unwrap().targets.len(), 2);
        assert!(LoraShape::parse("0:q").is_err());
        assert!(LoraShape::parse("8").is_err());
        assert!(LoraShape::parse("8:zz").is_err());
    }
}
