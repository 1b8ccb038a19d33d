//! `blyan-golden regen` rewrites `golden/vectors/*.json`; `blyan-golden check`
//! replays them and exits non-zero on the first mismatch.

use std::path::PathBuf;
use std::process::ExitCode;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

fn main() -> ExitCode {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    match cmd.as_str() {
        "regen" => {
            for s in blyan_golden::generate() {
                let path = dir().join(format!("{}.json", s.name));
                let text = serde_json::to_string_pretty(&s).expect("serialisable") + "\n";
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {}", path.display());
            }
            let path = dir().join("signing.json");
            let text = serde_json::to_string_pretty(&blyan_golden::signing_vectors())
                .expect("serialisable")
                + "\n";
            if let Err(e) = std::fs::write(&path, text) {
                eprintln!("cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
            let path = dir().join("pol_delta_format.json");
            let text =
                serde_json::to_string_pretty(&blyan_golden::delta_format::delta_format_vector())
                    .expect("serialisable")
                    + "\n";
            if let Err(e) = std::fs::write(&path, text) {
                eprintln!("cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
            ExitCode::SUCCESS
        }
        "check" => {
            let mut failed = false;
            for s in blyan_golden::generate() {
                let path = dir().join(format!("{}.json", s.name));
                let parsed = std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| {
                        serde_json::from_str::<blyan_golden::Scenario>(&t)
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|sc| blyan_golden::check(&sc));
                match parsed {
                    Ok(()) => println!("ok   {}", s.name),
                    Err(e) => {
                        println!("FAIL {}: {e}", s.name);
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            eprintln!("usage: blyan-golden regen|check");
            ExitCode::from(2)
        }
    }
}
