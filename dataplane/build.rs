//! Compiles the BPF programs in `../bpf/` with clang for the BPF target; the objects are
//! embedded in the crate (`include_bytes_aligned!`) and loaded at run time with aya.
use std::{env, path::PathBuf, process::Command};

const PROGRAMS: &[&str] = &["tc_service", "sock_lb"];

fn main() {
    let bpf = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../bpf");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", bpf.display());
    for entry in std::fs::read_dir(bpf.join("lib")).expect("bpf/lib") {
        println!("cargo:rerun-if-changed={}", entry.unwrap().path().display());
    }
    // the multiarch include directory holds asm/types.h, which linux/types.h needs
    let multiarch = format!("/usr/include/{}-linux-gnu", env::var("CARGO_CFG_TARGET_ARCH").unwrap());
    for name in PROGRAMS {
        let src = bpf.join(format!("{name}.bpf.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out.join(format!("{name}.o"));
        let status = Command::new(env::var("CLANG").unwrap_or_else(|_| "clang".into()))
            .args(["-g", "-O2", "-target", "bpf", "-Wall", "-Werror", "-I"])
            .arg(&multiarch)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| panic!("running clang for {}: {e} (scripts/deps.sh installs clang and libbpf-dev)", src.display()));
        assert!(status.success(), "clang failed to build {}", src.display());
    }
}
