//! `shoal-shim`: the per-container shim as a small binary of its own (`shoal shim` is the
//! same code inside the big binary). A container's shim lives as long as the container,
//! so what it costs is paid per container: a small executable keeps its private memory
//! (relocated data, allocator) small. Arguments as `shoal shim`'s (a leading `shim` word
//! is accepted); no argument parser, to stay small.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("shim") {
        args.next();
    }
    let mut a = shoal_agent::shim::ShimArgs { id: String::new(), bundle: Default::default(), root: Default::default(), runc: "runc".into(), log: Default::default(), log_max_bytes: 10 << 20, log_max_files: 5 };
    while let Some(flag) = args.next() {
        let Some(v) = args.next() else {
            eprintln!("shoal-shim: {flag} needs a value");
            std::process::exit(2);
        };
        match flag.as_str() {
            "--id" => a.id = v,
            "--bundle" => a.bundle = v.into(),
            "--root" => a.root = v.into(),
            "--runc" => a.runc = v.into(),
            "--log-file" => a.log = v.into(),
            "--log-max-bytes" => a.log_max_bytes = v.parse().unwrap_or(a.log_max_bytes),
            "--log-max-files" => a.log_max_files = v.parse().unwrap_or(a.log_max_files),
            f => {
                eprintln!("shoal-shim: unknown flag {f} (usage: shoal-shim --id ID --bundle DIR --root DIR --log-file FILE [--runc PATH] [--log-max-bytes N] [--log-max-files N])");
                std::process::exit(2);
            }
        }
    }
    if a.id.is_empty() || a.bundle.as_os_str().is_empty() || a.root.as_os_str().is_empty() || a.log.as_os_str().is_empty() {
        eprintln!("shoal-shim: --id, --bundle, --root and --log-file are required");
        std::process::exit(2);
    }
    std::process::exit(shoal_agent::shim::run(a));
}
