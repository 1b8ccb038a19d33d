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

use crate::Error;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload, rand_core::RngCore};
use aes_gcm::{Aes256Gcm, Nonce};
use blyan_state_machine::types::Address;
use k256::ecdsa::SigningKey;
use serde::{Deserialize, Serialize};

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
        let mut dk = [0u8; 32];
        pbkdf2_sha256(password.as_bytes(), &salt, iterations, &mut dk);
        let cipher = Aes256Gcm::new(&dk.into());
        let ciphertext = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &key.to_bytes(),
                    aad: &address.0,
                },
            )
            .expect("AES-GCM encryption of 32 bytes cannot fail");
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
        let mut dk = [0u8; 32];
        pbkdf2_sha256(password.as_bytes(), &salt, c.kdfparams.c, &mut dk);
        let nonce: [u8; 12] = nonce.try_into().expect("length checked above");
        let plain = Aes256Gcm::new(&dk.into())
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &self.address.0,
                },
            )
            .map_err(|_| Error::WrongPasswordOrTampered)?;
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

/// Writes `key` to `path` encrypted under `password` (refuses to overwrite).
pub fn write_key_file(
    path: &std::path::Path,
    key: &SigningKey,
    password: &str,
    iterations: u32,
) -> Result<KeyFile, Error> {
    use std::io::Write;
    let file = KeyFile::encrypt(key, password, iterations)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path.display(), e))?;
    f.write_all(file.to_json().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path.display(), e))?;
    Ok(file)
}

/// Reads and decrypts the key file at `path`.
pub fn read_key_file(path: &std::path::Path, password: &str) -> Result<SigningKey, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?;
    KeyFile::from_json(&text)?.decrypt(password)
}
