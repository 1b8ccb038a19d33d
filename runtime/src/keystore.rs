//! Encrypted key files (seed 6.1; `../shared/reference.md`, Cryptography).
//!
//! The familiar Ethereum keystore v3 shape, with the primitives the seed asks
//! for: PBKDF2-HMAC-SHA256 derives a 32-byte key from the password and a fresh
//! 16-byte salt; AES-256-GCM encrypts the 32-byte secp256k1 secret with a fresh
//! 12-byte nonce, and its 16-byte tag (appended to the ciphertext) replaces v3's
//! Keccak MAC. The iteration count is recorded in the file, so it can grow
//! without breaking old files; new files use [`DEFAULT_ITERATIONS`] (OWASP 2023
//! recommends ≥ 600,000 for PBKDF2-HMAC-SHA256; the seed's 100,000 is the floor
//! this module still opens, [`MIN_ITERATIONS`]).
//!
//! ```json
//! { "version": 1, "address": "0x…",
//!   "crypto": { "kdf": "pbkdf2", "kdfparams": { "prf": "hmac-sha256", "c": 600000, "dklen": 32, "salt": "…" },
//!               "cipher": "aes-256-gcm", "cipherparams": { "nonce": "…" }, "ciphertext": "…" } }
//! ```
//! The address is authenticated as associated data, so a file whose address
//! was edited fails to open.
//!
//! - **KEY-1** A key file is created with mode 0600, atomically: it is
//!   written and synced under a temporary name in the same directory (0600
//!   from its creation, whatever the umask), then linked to its name, which
//!   must not exist (a key file is never overwritten), and the directory is
//!   synced. A crash leaves no partial file under the name.
//! - **KEY-2** A password is never silently empty. It comes from, in order:
//!   `--password` (scripts, the devnet), `--password-file` (its first line),
//!   an environment variable (`BLYAN_KEY_PASSWORD` by default), or a prompt
//!   with echo off when standard input is a terminal; with none of them it
//!   is an error that names them ([`resolve_password`]). A new key file
//!   refuses an empty password.
//! - **KEY-3** Derived keys, decrypted secrets and passwords are wiped from
//!   memory when dropped (`zeroize`; the AES-GCM key schedule too, through
//!   the `zeroize` features of `aes` and `aes-gcm`).

use crate::Error;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload, rand_core::RngCore};
use aes_gcm::{Aes256Gcm, Nonce};
use blyan_state_machine::types::Address;
use k256::ecdsa::SigningKey;
use serde::{Deserialize, Serialize};
use std::path::Path;
use zeroize::{Zeroize, Zeroizing};

/// Iterations for new key files (OWASP 2023 for PBKDF2-HMAC-SHA256).
pub const DEFAULT_ITERATIONS: u32 = 600_000;
/// Fewest iterations a key file may record (the seed's 100k).
pub const MIN_ITERATIONS: u32 = 100_000;
/// Most iterations accepted, so a hostile file cannot stall the node for hours.
pub const MAX_ITERATIONS: u32 = 100_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    pub prf: String,
    pub c: u32,
    pub dklen: u32,
    pub salt: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CipherParams {
    pub nonce: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Crypto {
    pub kdf: String,
    pub kdfparams: KdfParams,
    pub cipher: String,
    pub cipherparams: CipherParams,
    pub ciphertext: String,
}

/// A key file's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub version: u32,
    pub address: Address,
    pub crypto: Crypto,
}

/// PBKDF2-HMAC-SHA256 (RFC 8018) into `out`.
pub fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    assert!(iterations > 0, "PBKDF2 needs at least one iteration");
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out);
}

/// The 32-byte AES key of a key file, wiped when dropped (KEY-3).
pub fn derive_key(password: &str, salt: &[u8], iterations: u32) -> Zeroizing<[u8; 32]> {
    let mut dk = Zeroizing::new([0u8; 32]);
    pbkdf2_sha256(password.as_bytes(), salt, iterations, dk.as_mut_slice());
    dk
}

/// AES-256-GCM keyed by `dk` without copying the key (the cipher wipes its
/// own key schedule when dropped).
fn cipher(dk: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new_from_slice(dk).expect("AES-256 takes a 32-byte key")
}

impl KeyFile {
    /// Encrypts `key` under `password` with fresh randomness.
    pub fn encrypt(key: &SigningKey, password: &str, iterations: u32) -> Result<KeyFile, Error> {
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(Error::KeyFileWeakKdf(iterations));
        }
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 12];
        OsRng
            .try_fill_bytes(&mut salt)
            .map_err(|e| Error::Randomness(e.to_string()))?;
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| Error::Randomness(e.to_string()))?;
        Ok(Self::encrypt_with(key, password, iterations, salt, nonce))
    }

    /// Deterministic encryption for tests: callers must never reuse a nonce.
    pub fn encrypt_with(
        key: &SigningKey,
        password: &str,
        iterations: u32,
        salt: [u8; 16],
        nonce: [u8; 12],
    ) -> KeyFile {
        let address = Address::from_public_key(key.verifying_key());
        let dk = derive_key(password, &salt, iterations);
        let mut secret = key.to_bytes();
        let ciphertext = cipher(&dk)
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &secret,
                    aad: &address.0,
                },
            )
            .expect("AES-GCM encryption of 32 bytes cannot fail");
        secret[..].zeroize();
        KeyFile {
            version: 1,
            address,
            crypto: Crypto {
                kdf: "pbkdf2".into(),
                kdfparams: KdfParams {
                    prf: "hmac-sha256".into(),
                    c: iterations,
                    dklen: 32,
                    salt: hex::encode(salt),
                },
                cipher: "aes-256-gcm".into(),
                cipherparams: CipherParams {
                    nonce: hex::encode(nonce),
                },
                ciphertext: hex::encode(ciphertext),
            },
        }
    }

    /// Decrypts the key; every malformed field, a wrong password and any
    /// tampering give a clear error, never a panic.
    pub fn decrypt(&self, password: &str) -> Result<SigningKey, Error> {
        let c = &self.crypto;
        let unsupported = |what, found: &str, supported| Error::KeyFileUnsupported {
            what,
            found: found.to_string(),
            supported,
        };
        if self.version != 1 {
            return Err(unsupported("version", &self.version.to_string(), "1"));
        }
        if c.kdf != "pbkdf2" {
            return Err(unsupported("kdf", &c.kdf, "pbkdf2"));
        }
        if c.kdfparams.prf != "hmac-sha256" {
            return Err(unsupported("prf", &c.kdfparams.prf, "hmac-sha256"));
        }
        if c.kdfparams.dklen != 32 {
            return Err(unsupported("dklen", &c.kdfparams.dklen.to_string(), "32"));
        }
        if c.cipher != "aes-256-gcm" {
            return Err(unsupported("cipher", &c.cipher, "aes-256-gcm"));
        }
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&c.kdfparams.c) {
            return Err(Error::KeyFileWeakKdf(c.kdfparams.c));
        }
        let hex_field = |name: &str, v: &str| {
            hex::decode(v).map_err(|e| Error::KeyFileMalformed(format!("{name}: {e}")))
        };
        let salt = hex_field("salt", &c.kdfparams.salt)?;
        let nonce = hex_field("nonce", &c.cipherparams.nonce)?;
        let ciphertext = hex_field("ciphertext", &c.ciphertext)?;
        if salt.len() < 16 || nonce.len() != 12 || ciphertext.len() != 48 {
            return Err(Error::KeyFileMalformed(
                "salt must be at least 16 bytes, nonce 12, ciphertext 48 (32 + tag)".into(),
            ));
        }
        let dk = derive_key(password, &salt, c.kdfparams.c);
        let nonce: [u8; 12] = nonce.try_into().expect("length checked above");
        let plain = Zeroizing::new(
            cipher(&dk)
                .decrypt(
                    &Nonce::from(nonce),
                    Payload {
                        msg: &ciphertext,
                        aad: &self.address.0,
                    },
                )
                .map_err(|_| Error::WrongPasswordOrTampered)?,
        );
        let key = SigningKey::from_slice(&plain).map_err(|_| Error::InvalidSecretKey)?;
        if Address::from_public_key(key.verifying_key()) != self.address {
            return Err(Error::WrongPasswordOrTampered);
        }
        Ok(key)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("key files always serialise")
    }

    pub fn from_json(text: &str) -> Result<KeyFile, Error> {
        serde_json::from_str(text).map_err(|e| Error::KeyFileMalformed(e.to_string()))
    }
}

/// A fresh secp256k1 key from operating-system randomness.
pub fn generate_key() -> Result<SigningKey, Error> {
    // A random 32-byte string is a valid scalar except with probability ~2^-128.
    for _ in 0..16 {
        let mut bytes = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| Error::Randomness(e.to_string()))?;
        if let Ok(k) = SigningKey::from_slice(&bytes) {
            return Ok(k);
        }
    }
    Err(Error::Randomness("16 invalid scalars in a row".into()))
}

/// Writes `key` to `path` encrypted under `password` (KEY-1: mode 0600,
/// atomic, never overwrites; KEY-2: the password must not be empty).
pub fn write_key_file(
    path: &Path,
    key: &SigningKey,
    password: &str,
    iterations: u32,
) -> Result<KeyFile, Error> {
    if password.is_empty() {
        return Err(Error::PasswordEmpty);
    }
    let file = KeyFile::encrypt(key, password, iterations)?;
    write_private_file(path, file.to_json().as_bytes())?;
    Ok(file)
}

/// KEY-1: `bytes` as a new file at `path`, mode 0600, all or nothing.
fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = path
        .file_name()
        .ok_or_else(|| Error::Config(format!("{} names no file", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tag = [0u8; 8];
    OsRng
        .try_fill_bytes(&mut tag)
        .map_err(|e| Error::Randomness(e.to_string()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        hex::encode(tag)
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // Exactly 0600, whatever the umask took away.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        // A link, unlike a rename, fails if `path` exists.
        std::fs::hard_link(&tmp, path)
    })();
    let removed = std::fs::remove_file(&tmp);
    written.map_err(|e| Error::io(path.display(), e))?;
    removed.map_err(|e| Error::io(tmp.display(), e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir.display(), e))
}

/// Reads and decrypts the key file at `path`.
pub fn read_key_file(path: &Path, password: &str) -> Result<SigningKey, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?;
    KeyFile::from_json(&text)?.decrypt(password)
}

/// A password in memory, wiped when dropped (KEY-3).
pub type Password = Zeroizing<String>;

/// Where a password may come from (KEY-2), in the order they are tried.
#[derive(Clone, Copy, Debug, Default)]
pub struct PasswordSources<'a> {
    /// `--password`: for scripts and the devnet (other local users can see
    /// a process's arguments).
    pub given: Option<&'a str>,
    /// `--password-file`: the password is the file's first line.
    pub file: Option<&'a Path>,
    /// The name of an environment variable holding the password.
    pub env: Option<&'a str>,
}

/// Whether to ask on the terminal when no source gives a password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prompt {
    Never,
    /// Ask once (to open a key file).
    Once,
    /// Ask twice and compare (to create one).
    Twice,
}

/// KEY-2: the password from the first of `sources` that gives one, else
/// from the terminal (if `prompt` allows it and standard input is a
/// terminal), else [`Error::PasswordMissing`]. An empty value given
/// explicitly (an empty flag, file line or variable) is kept: it opens key
/// files written before KEY-2, and [`write_key_file`] refuses it.
pub fn resolve_password(sources: PasswordSources<'_>, prompt: Prompt) -> Result<Password, Error> {
    use std::io::IsTerminal;
    if sources.given.is_some() && sources.file.is_some() {
        return Err(Error::Config(
            "give --password or --password-file, not both".into(),
        ));
    }
    if let Some(p) = sources.given {
        return Ok(Zeroizing::new(p.to_owned()));
    }
    if let Some(path) = sources.file {
        return read_password_file(path);
    }
    if let Some(var) = sources.env {
        match std::env::var(var) {
            Ok(p) => return Ok(Zeroizing::new(p)),
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(Error::Config(format!("{var} is not UTF-8")));
            }
        }
    }
    if prompt != Prompt::Never && std::io::stdin().is_terminal() {
        return prompt_password(prompt == Prompt::Twice);
    }
    Err(Error::PasswordMissing {
        env: sources
            .env
            .unwrap_or(crate::config::DEFAULT_PASSWORD_ENV)
            .to_owned(),
    })
}

/// The first line of `path` (without its `\n` or `\r\n`).
fn read_password_file(path: &Path) -> Result<Password, Error> {
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?);
    let line = text.split('\n').next().unwrap_or_default();
    Ok(Zeroizing::new(
        line.strip_suffix('\r').unwrap_or(line).to_owned(),
    ))
}

/// Asks on the terminal with echo off (`rpassword`, which reads the
/// controlling terminal, not standard input).
fn prompt_password(confirm: bool) -> Result<Password, Error> {
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt)
            .map(Zeroizing::new)
            .map_err(|e| Error::io("the terminal", e))
    };
    let password = ask("Key file password: ")?;
    if confirm && *ask("Repeat the password: ")? != *password {
        return Err(Error::PasswordMismatch);
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).expect("valid scalar")
    }

    /// KEY-1: 0600 from the start, nothing left behind, never overwritten.
    #[test]
    fn key_files_are_written_0600_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("key.json");
        let file = write_key_file(&path, &key(), "pw", MIN_ITERATIONS).expect("write");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["key.json"], "no temporary file is left behind");
        let before = std::fs::read(&path).expect("read");
        let err = write_key_file(&path, &key(), "other", MIN_ITERATIONS)
            .expect_err("an existing key file is never overwritten");
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), before);
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
        assert_eq!(
            read_key_file(&path, "pw").expect("decrypt").to_bytes(),
            key().to_bytes()
        );
        let text = String::from_utf8(before).expect("utf-8");
        assert_eq!(KeyFile::from_json(&text).expect("parse"), file);
        // A path that names no file is refused.
        assert!(write_key_file(Path::new(""), &key(), "pw", MIN_ITERATIONS).is_err());
    }

    /// KEY-2: a new key file is never encrypted under an empty password.
    #[test]
    fn new_key_files_refuse_an_empty_password() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("key.json");
        let err = write_key_file(&path, &key(), "", MIN_ITERATIONS).expect_err("empty");
        assert!(matches!(err, Error::PasswordEmpty), "{err}");
        assert!(!path.exists());
    }

    /// KEY-2: no source and no terminal is an error naming the options,
    /// never an empty password.
    #[test]
    fn a_missing_password_is_an_error_that_names_the_options() {
        let unset = "BLYAN_TEST_UNSET_PASSWORD_VARIABLE";
        assert!(std::env::var_os(unset).is_none());
        for prompt in [Prompt::Never, Prompt::Once, Prompt::Twice] {
            let sources = PasswordSources {
                env: Some(unset),
                ..PasswordSources::default()
            };
            // `cargo test` never has a terminal on standard input here:
            // Prompt::Never makes the first case hold even where it has.
            if prompt != Prompt::Never && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                continue;
            }
            let err = resolve_password(sources, prompt).expect_err("no password");
            assert!(matches!(err, Error::PasswordMissing { .. }), "{err}");
            let msg = err.to_string();
            for option in ["--password-file", unset, "--password ", "terminal"] {
                assert!(msg.contains(option), "{msg:?} lacks {option:?}");
            }
        }
    }

    /// KEY-2: the flag, then the file's first line, then the environment.
    #[test]
    fn passwords_come_from_the_flag_a_file_or_the_environment() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from file\r\nsecond line\n").expect("write");
        let get = |s: PasswordSources<'_>| {
            resolve_password(s, Prompt::Never)
                .map(|p| p.to_string())
                .map_err(|e| e.to_string())
        };
        // Any variable that is set stands for the environment here (tests
        // cannot set one: `set_var` is unsafe).
        let (var, value) = std::env::vars().next().expect("some variable is set");
        let env = PasswordSources {
            env: Some(&var),
            ..PasswordSources::default()
        };
        assert_eq!(get(env), Ok(value));
        let from_file = PasswordSources {
            file: Some(&file),
            ..env
        };
        assert_eq!(get(from_file), Ok("from file".into()));
        let given = PasswordSources {
            given: Some("flag"),
            ..env
        };
        assert_eq!(get(given), Ok("flag".into()));
        assert!(
            get(PasswordSources {
                given: Some("flag"),
                ..from_file
            })
            .is_err(),
            "--password and --password-file together"
        );
        let missing = dir.path().join("absent");
        assert!(
            get(PasswordSources {
                file: Some(&missing),
                ..env
            })
            .is_err(),
            "an unreadable file is an error, not the next source"
        );
        std::fs::write(&file, "").expect("write");
        assert_eq!(
            get(PasswordSources {
                file: Some(&file),
                ..PasswordSources::default()
            }),
            Ok(String::new()),
            "an explicitly empty password is kept (old key files)"
        );
    }

    /// KEY-3: the derived key and passwords are `ZeroizeOnDrop` types, and
    /// the same derived key opens the file.
    #[test]
    fn derived_keys_and_passwords_are_wiped_on_drop() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        let salt = [1u8; 16];
        let mut dk = derive_key("pw", &salt, MIN_ITERATIONS);
        wiped_on_drop(&dk);
        let mut expected = [0u8; 32];
        pbkdf2_sha256(b"pw", &salt, MIN_ITERATIONS, &mut expected);
        assert_eq!(*dk, expected);
        dk.zeroize();
        assert_eq!(*dk, [0u8; 32]);
        let p = resolve_password(
            PasswordSources {
                given: Some("x"),
                ..PasswordSources::default()
            },
            Prompt::Never,
        )
        .expect("given");
        wiped_on_drop(&p);
        let file = KeyFile::encrypt_with(&key(), "pw", MIN_ITERATIONS, salt, [2; 12]);
        assert_eq!(
            file.decrypt("pw").expect("decrypt").to_bytes(),
            key().to_bytes()
        );
    }
}
