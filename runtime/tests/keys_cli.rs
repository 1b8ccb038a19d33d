//! `blyan keys`: where the password comes from and how key files are
//! written (KEY-1, KEY-2 in `keystore`), through the binary.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use blyan_runtime::keystore::read_key_file;

/// `blyan ARGS` with no terminal and no password in the environment, plus
/// `env`.
fn blyan(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_blyan"));
    cmd.args(args)
        .env_remove("BLYAN_KEY_PASSWORD")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run blyan")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// KEY-2: before, a missing password silently became "" and the key file
/// was written under it.
#[test]
fn keys_new_without_a_password_is_an_error_that_names_the_options() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("key.json");
    let o = blyan(&["keys", "new", "--out", out.to_str().unwrap()], &[]);
    let stderr = text(&o.stderr);
    assert!(!o.status.success(), "succeeded: {}", text(&o.stdout));
    for option in ["--password-file", "BLYAN_KEY_PASSWORD", "--password "] {
        assert!(stderr.contains(option), "{stderr:?} lacks {option:?}");
    }
    assert!(!out.exists(), "no key file without a password");
    let o = blyan(
        &[
            "keys",
            "new",
            "--out",
            out.to_str().unwrap(),
            "--password",
            "",
        ],
        &[],
    );
    assert!(!o.status.success(), "an empty password must be refused");
    assert!(!out.exists());
}

/// KEY-1 and KEY-2: `--password-file` and the environment both work, the
/// files are 0600, and `keys show` opens them the same ways.
#[test]
fn keys_new_takes_a_password_file_or_the_environment_and_writes_0600() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pw = dir.path().join("pw.txt");
    std::fs::write(&pw, "file secret\n").expect("write");
    let a = dir.path().join("a.json");
    let o = blyan(
        &[
            "keys",
            "new",
            "--out",
            a.to_str().unwrap(),
            "--password-file",
            pw.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(mode(&a), 0o600);
    read_key_file(&a, "file secret").expect("the file's first line is the password");

    let b = dir.path().join("b.json");
    let o = blyan(
        &["keys", "new", "--out", b.to_str().unwrap()],
        &[("BLYAN_KEY_PASSWORD", "env secret")],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(mode(&b), 0o600);
    read_key_file(&b, "env secret").expect("the environment's password");

    let o = blyan(
        &[
            "keys",
            "show",
            "--key",
            a.to_str().unwrap(),
            "--password-file",
            pw.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("public key"),
        "{}",
        text(&o.stdout)
    );
    let o = blyan(
        &[
            "keys",
            "show",
            "--key",
            a.to_str().unwrap(),
            "--password",
            "x",
            "--password-file",
            pw.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        !o.status.success(),
        "--password and --password-file together"
    );
}
