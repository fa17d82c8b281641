//! Compiles proto/analytics/v1/analytics.proto into OUT_DIR (never into src/) and
//! writes the descriptor set that server reflection serves.
//! `protoc` comes from the protoc-bin-vendored crate, so no system package is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable.
    std::env::set_var("PROTOC", protoc);

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("analytics_descriptor.bin"))
        .compile_protos(&["proto/analytics/v1/analytics.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    // refinery embeds migrations/ at compile time; a file added there must rebuild too.
    println!("cargo:rerun-if-changed=migrations");

    // Build metadata for analytics_build_info: GIT_COMMIT (set by the image build) or
    // the checkout's HEAD, else "unknown".
    let git_commit = std::env::var("GIT_COMMIT").ok().filter(|commit| !commit.is_empty()).or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .map(|commit| commit.trim().to_string())
    });
    println!("cargo:rustc-env=ANALYTICS_GIT_COMMIT={}", git_commit.as_deref().unwrap_or("unknown"));
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    Ok(())
}
