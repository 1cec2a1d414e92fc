//! Drift guard for the checked-in generated code.
//!
//! Regenerates `src/gen/` from `proto/` into a temporary directory with the vendored protoc and
//! compares byte for byte. `FERRY_BLESS=1 cargo test -p ferry-proto --test codegen` rewrites the
//! checked-in files instead.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn generate(out: &Path) {
    let root = workspace_root();
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    let protos = [
        root.join("proto/ferry/v1/inference.proto"),
        root.join("proto/ferry/v1/offload.proto"),
    ];
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(out)
        .file_descriptor_set_path(out.join("ferry_descriptor.bin"))
        .emit_rerun_if_changed(false)
        .compile_with_config(config, &protos, &[root.join("proto")])
        .expect("protoc failed");
}

#[test]
fn generated_code_matches_proto() {
    let tmp = tempfile::tempdir().unwrap();
    generate(tmp.path());
    let gen_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    let bless = std::env::var_os("FERRY_BLESS").is_some();
    let mut drift = Vec::new();
    for entry in std::fs::read_dir(tmp.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let fresh = std::fs::read(entry.path()).unwrap();
        let checked_in = gen_dir.join(&name);
        if bless {
            std::fs::create_dir_all(&gen_dir).unwrap();
            std::fs::write(&checked_in, &fresh).unwrap();
        } else if std::fs::read(&checked_in).ok().as_deref() != Some(fresh.as_slice()) {
            drift.push(name.to_string_lossy().into_owned());
        }
    }
    assert!(
        drift.is_empty(),
        "generated code is stale for {drift:?}; run `FERRY_BLESS=1 cargo test -p ferry-proto --test codegen`"
    );
}
