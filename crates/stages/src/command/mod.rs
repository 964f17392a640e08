//! `command`: run any program as a stage (DVC / Snakemake style).
//!
//! The argv runs without a shell unless `shell` is used. Placeholders `{out}`, `{partial}`, `{seed}`,
//! `{device}`, `{ROLE}` (an upstream stage's artifact directory) and `{PARAM}` are substituted in `cmd`,
//! `shell` and `env` values; `{{` and `}}` are literal braces. In `cmd` and `env` a value is pasted into its
//! one argument or variable; in a `shell` script it becomes a quoted variable reference, never script text
//! (see [`shell`]). The same paths are exported as `SAEFLOW_OUT`, `SAEFLOW_PARTIAL`, `SAEFLOW_SEED`,
//! `SAEFLOW_DEVICE` and `SAEFLOW_INPUT_<ROLE>`.

mod shell;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use saeflow_core::cancel::Cancelled;
use saeflow_runner::stage::{
    key_path, KeySeg, ParamError, Reference, References, Stage, StageContext,
};

/// Parameters of a `command` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// Program and arguments, run without a shell. Exactly one of `cmd` and `shell`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// A script for `sh -c`, for when pipes or redirections are wanted. Placeholders expand to their value as
    /// one word wherever they stand (unquoted, in double or single quotes): a path with spaces or a value with
    /// `;` is data, never shell syntax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Upstream stages, by the role name the placeholders use: `{ labels = "labels" }`.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Files or directories whose content enters the action key (the script itself included).
    #[serde(default)]
    pub deps: Vec<String>,
    /// Files the command must write into `{out}`; the stage fails if one is missing.
    #[serde(default)]
    pub outs: Vec<String>,
    /// Extra environment variables (placeholders allowed in values).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Free parameters (Snakemake's `params`): part of the key, available as `{name}` placeholders and as
    /// `SAEFLOW_PARAM_<NAME>`; sweep them with `-S stage.params.name=a,b`.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
}

const BUILTIN_PLACEHOLDERS: [&str; 4] = ["out", "partial", "seed", "device"];

fn param_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The `command` stage kind.
pub struct Command;

impl Stage for Command {
    type Params = CommandParams;
    const KIND: &'static str = "command";
    // 2: `shell` placeholders are quoted variable references (a value with spaces is one word).
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "Run a program; its deps and outputs are hashed like any stage's";

    fn references(p: &CommandParams) -> References {
        References {
            inputs: p
                .inputs
                .iter()
                .map(|(role, stage)| Reference {
                    role: role.clone(),
                    target: stage.clone(),
                    at: key_path(&["inputs", role]),
                })
                .collect(),
            models: Vec::new(),
            files: p
                .deps
                .iter()
                .enumerate()
                .map(|(i, d)| Reference {
                    role: String::new(),
                    target: d.clone(),
                    at: vec![KeySeg::Key("deps".into()), KeySeg::Index(i)],
                })
                .collect(),
        }
    }

    fn validate(p: &CommandParams) -> Result<(), ParamError> {
        if p.cmd.is_empty() == p.shell.is_none() {
            return Err(ParamError {
                at: key_path(&[if p.cmd.is_empty() { "shell" } else { "cmd" }]),
                message: "give exactly one of `cmd` (argv, no shell) or `shell` (a sh -c script)"
                    .into(),
            });
        }
        for name in p.params.keys() {
            if BUILTIN_PLACEHOLDERS.contains(&name.as_str()) || p.inputs.contains_key(name) {
                return Err(ParamError {
                    at: key_path(&["params", name]),
                    message: format!(
                        "parameter `{name}` clashes with a built-in placeholder or an input role"
                    ),
                });
            }
        }
        let known = |name: &str| {
            BUILTIN_PLACEHOLDERS.contains(&name)
                || p.inputs.contains_key(name)
                || p.params.contains_key(name)
        };
        let mut texts: Vec<(Vec<KeySeg>, &str)> = p
            .cmd
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (
                    vec![KeySeg::Key("cmd".into()), KeySeg::Index(i)],
                    a.as_str(),
                )
            })
            .collect();
        if let Some(s) = &p.shell {
            texts.push((key_path(&["shell"]), s));
        }
        for (k, v) in &p.env {
            texts.push((key_path(&["env", k]), v));
        }
        for (at, text) in texts {
            for name in placeholders(text).map_err(|message| ParamError {
                at: at.clone(),
                message,
            })? {
                if !known(&name) {
                    let mut names = BUILTIN_PLACEHOLDERS.to_vec();
                    names.extend(p.inputs.keys().map(String::as_str));
                    names.extend(p.params.keys().map(String::as_str));
                    return Err(ParamError {
                        at,
                        message: format!(
                            "unknown placeholder `{{{name}}}` (known: {})",
                            names.join(", ")
                        ),
                    });
                }
            }
        }
        if let Some(script) = &p.shell {
            // Quoting contexts a placeholder cannot stand in (after a backslash, in a quoted here-document)
            // are refused here rather than when the stage runs.
            let names = placeholders(script).unwrap_or_default();
            let vars = names.into_iter().map(|n| (n, String::new())).collect();
            let pieces = pieces(script).map_err(|message| ParamError {
                at: key_path(&["shell"]),
                message,
            })?;
            shell::make_safe(&pieces, &vars).map_err(|message| ParamError {
                at: key_path(&["shell"]),
                message,
            })?;
        }
        for (i, out) in p.outs.iter().enumerate() {
            let path = std::path::Path::new(out);
            if out.is_empty()
                || path.is_absolute()
                || path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(ParamError {
                    at: vec![KeySeg::Key("outs".into()), KeySeg::Index(i)],
                    message: format!(
                        "output `{out}` must be a relative path inside the output directory"
                    ),
                });
            }
        }
        Ok(())
    }

    fn run(p: &CommandParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        vars.insert("out".into(), ctx.out_dir.display().to_string());
        vars.insert("partial".into(), ctx.partial_dir.display().to_string());
        vars.insert("seed".into(), ctx.seed.to_string());
        vars.insert("device".into(), ctx.device.to_string());
        for (role, dir) in &ctx.inputs {
            vars.insert(role.clone(), dir.display().to_string());
        }
        for (name, value) in &p.params {
            vars.insert(name.clone(), param_text(value));
        }
        let subst = |s: &str| substitute(s, &vars);

        let mut process = match &p.shell {
            Some(script) => {
                let safe = shell::make_safe(&pieces(script).map_err(anyhow::Error::msg)?, &vars)
                    .map_err(anyhow::Error::msg)?;
                let mut c = Process::new("sh");
                c.arg("-c").arg(safe.script).envs(safe.env);
                c
            }
            None => {
                let mut c = Process::new(subst(&p.cmd[0])?);
                for a in &p.cmd[1..] {
                    c.arg(subst(a)?);
                }
                c
            }
        };
        process.current_dir(&ctx.workdir);
        process
            .env("SAEFLOW_OUT", &ctx.out_dir)
            .env("SAEFLOW_PARTIAL", &ctx.partial_dir);
        process
            .env("SAEFLOW_SEED", ctx.seed.to_string())
            .env("SAEFLOW_DEVICE", ctx.device.to_string());
        for (role, dir) in &ctx.inputs {
            process.env(format!("SAEFLOW_INPUT_{}", role.to_uppercase()), dir);
        }
        for (name, value) in &p.params {
            process.env(
                format!("SAEFLOW_PARAM_{}", name.to_uppercase()),
                param_text(value),
            );
        }
        for (k, v) in &p.env {
            process.env(k, subst(v)?);
        }
        let log = std::fs::File::create(&ctx.log_path)
            .with_context(|| format!("creating {}", ctx.log_path.display()))?;
        process
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl and setpgid are async-signal-safe. The child gets SIGKILL if the runner dies (so a
        // killed run leaves no orphan writing into the cache) and its own process group (so Ctrl-C reaches
        // the runner, which then stops the child deliberately).
        unsafe {
            process.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let program = p.cmd.first().cloned().unwrap_or_else(|| "sh".into());
        let mut child = process
            .spawn()
            .with_context(|| format!("cannot start `{program}`"))?;
        ctx.progress.set_message(&format!("running {program}"));
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if ctx.cancel.is_cancelled() {
                stop(&mut child);
                return Err(Cancelled.into());
            }
            ctx.progress.tick();
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            let tail = log_tail(&ctx.log_path, 20);
            let how = match status.code() {
                Some(code) => format!("exited with status {code}"),
                None => format!(
                    "was killed by signal {}",
                    std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
                ),
            };
            bail!(
                "`{program}` {how}; last lines of {}:\n{tail}",
                ctx.log_path.display()
            );
        }
        for out in &p.outs {
            if !ctx.out_dir.join(out).exists() {
                bail!(
                    "`{program}` succeeded but did not write declared output `{out}` into {{out}}"
                );
            }
        }
        Ok(())
    }
}

/// A piece of a placeholder string: literal text or a `{name}`.
enum Piece {
    Text(String),
    Var(String),
}

/// Splits a string into text and `{placeholders}`; `{{` / `}}` are literal braces.
fn pieces(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' | '}' if chars.peek() == Some(&c) => {
                chars.next();
                text.push(c);
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(format!(
                        "bad placeholder `{{{name}` in `{s}` (write `{{{{` for a literal brace)"
                    ));
                }
                out.push(Piece::Text(std::mem::take(&mut text)));
                out.push(Piece::Var(name));
            }
            '}' => {
                return Err(format!(
                    "unmatched `}}` in `{s}` (write `}}}}` for a literal brace)"
                ))
            }
            c => text.push(c),
        }
    }
    out.push(Piece::Text(text));
    Ok(out)
}

/// Names of `{placeholders}` in a string.
fn placeholders(s: &str) -> Result<Vec<String>, String> {
    Ok(pieces(s)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Var(name) => Some(name),
            Piece::Text(_) => None,
        })
        .collect())
}

/// Replaces every `{name}` by its value.
fn substitute(s: &str, vars: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut out = String::with_capacity(s.len());
    for piece in pieces(s).map_err(anyhow::Error::msg)? {
        match piece {
            Piece::Text(t) => out.push_str(&t),
            Piece::Var(name) => out.push_str(
                vars.get(&name)
                    .with_context(|| format!("unknown placeholder {{{name}}}"))?,
            ),
        }
    }
    Ok(out)
}

/// Stops a child and its process group: SIGTERM, then SIGKILL after a grace period.
fn stop(child: &mut std::process::Child) {
    let pgid = child.id() as i32;
    // SAFETY: plain kill(2) on the child's own process group.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
}

fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_escapes() {
        assert_eq!(placeholders("{out}/x {{lit}} {a}").unwrap(), ["out", "a"]);
        assert!(placeholders("a } b").is_err());
        let vars = BTreeMap::from([("out".to_string(), "/o".to_string())]);
        assert_eq!(substitute("{out}/f {{x}}", &vars).unwrap(), "/o/f {x}");
    }
}
