//! Key files: round trip, failures, and the primitives against Wycheproof.
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use blyan_runtime::Error;
use blyan_runtime::keystore::{KeyFile, MIN_ITERATIONS, pbkdf2_sha256};
use blyan_state_machine::testkit::key;

fn vectors(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn round_trip_and_wrong_password() {
    let k = key(3);
    let file = KeyFile::encrypt(&k, "correct horse", MIN_ITERATIONS).unwrap();
    let parsed = KeyFile::from_json(&file.to_json()).unwrap();
    assert_eq!(
        parsed.decrypt("correct horse").unwrap().to_bytes(),
        k.to_bytes()
    );
    assert!(matches!(
        parsed.decrypt("wrong"),
        Err(Error::WrongPasswordOrTampered)
    ));
    // Fresh salt and nonce each time.
    let again = KeyFile::encrypt(&k, "correct horse", MIN_ITERATIONS).unwrap();
    assert_ne!(again.crypto.cipherparams, file.crypto.cipherparams);
}

#[test]
fn tampering_and_malformed_files_give_clear_errors() {
    let k = key(4);
    let file = KeyFile::encrypt_with(&k, "pw", MIN_ITERATIONS, [1; 16], [2; 12]);
    let mut bad = file.clone();
    bad.address = blyan_state_machine::testkit::address(&key(5));
    assert!(
        matches!(bad.decrypt("pw"), Err(Error::WrongPasswordOrTampered)),
        "address is authenticated"
    );
    let mut bad = file.clone();
    bad.crypto.ciphertext.replace_range(0..2, "ff");
    assert!(matches!(
        bad.decrypt("pw"),
        Err(Error::WrongPasswordOrTampered)
    ));
    let mut bad = file.clone();
    bad.crypto.kdfparams.c = 1_000;
    assert!(matches!(
        bad.decrypt("pw"),
        Err(Error::KeyFileWeakKdf(1_000))
    ));
    let mut bad = file.clone();
    bad.crypto.cipher = "aes-128-ctr".into();
    assert!(matches!(
        bad.decrypt("pw"),
        Err(Error::KeyFileUnsupported { what: "cipher", .. })
    ));
    let mut bad = file.clone();
    bad.crypto.cipherparams.nonce = "zz".into();
    assert!(matches!(bad.decrypt("pw"), Err(Error::KeyFileMalformed(_))));
    let mut bad = file;
    bad.crypto.ciphertext.truncate(10);
    assert!(matches!(bad.decrypt("pw"), Err(Error::KeyFileMalformed(_))));
    assert!(matches!(
        KeyFile::from_json("{}"),
        Err(Error::KeyFileMalformed(_))
    ));
    assert!(KeyFile::encrypt(&key(6), "pw", 10).is_err());
}

#[test]
fn wycheproof_pbkdf2_hmac_sha256() {
    let doc = vectors("pbkdf2_hmacsha256_test.json");
    let mut n = 0;
    for g in doc["testGroups"].as_array().unwrap() {
        for t in g["tests"].as_array().unwrap() {
            let password = hex::decode(t["password"].as_str().unwrap()).unwrap();
            let salt = hex::decode(t["salt"].as_str().unwrap()).unwrap();
            let expected = hex::decode(t["dk"].as_str().unwrap()).unwrap();
            let mut out = vec![0u8; t["dkLen"].as_u64().unwrap() as usize];
            pbkdf2_sha256(
                &password,
                &salt,
                t["iterationCount"].as_u64().unwrap() as u32,
                &mut out,
            );
            assert_eq!(
                out == expected,
                t["result"] == "valid",
                "tcId {}",
                t["tcId"]
            );
            n += 1;
        }
    }
    assert_eq!(n, 60);
}

/// The AES-256-GCM configuration key files use: 256-bit keys, 96-bit nonces, 128-bit tags.
#[test]
fn wycheproof_aes_256_gcm_96_bit_nonce() {
    let doc = vectors("aes_gcm_test.json");
    let mut n = 0;
    for g in doc["testGroups"].as_array().unwrap() {
        if g["keySize"] != 256 || g["ivSize"] != 96 || g["tagSize"] != 128 {
            continue;
        }
        for t in g["tests"].as_array().unwrap() {
            let h = |f: &str| hex::decode(t[f].as_str().unwrap()).unwrap();
            let key: [u8; 32] = h("key").try_into().unwrap();
            let iv: [u8; 12] = h("iv").try_into().unwrap();
            let cipher = Aes256Gcm::new(&key.into());
            let mut sealed = h("ct");
            sealed.extend(h("tag"));
            let opened = cipher.decrypt(
                &Nonce::from(iv),
                Payload {
                    msg: &sealed,
                    aad: &h("aad"),
                },
            );
            match t["result"].as_str().unwrap() {
                "valid" => {
                    assert_eq!(opened.unwrap(), h("msg"), "tcId {}", t["tcId"]);
                    let resealed = cipher
                        .encrypt(
                            &Nonce::from(iv),
                            Payload {
                                msg: &h("msg"),
                                aad: &h("aad"),
                            },
                        )
                        .unwrap();
                    assert_eq!(resealed, sealed);
                }
                _ => assert!(opened.is_err(), "tcId {} must not open", t["tcId"]),
            }
            n += 1;
        }
    }
    assert!(n >= 50, "{n}");
}

/// KEY-2 for `blyan node`: a node whose configuration names no password
/// source that gives one does not start with an empty password; it refuses
/// with an error naming the options. A `key_password_file` works.
#[test]
fn key_2_a_node_without_a_password_refuses_to_start_and_a_password_file_works() {
    use blyan_runtime::config::FileConfig;
    use blyan_runtime::devnet::{DEVNET_PASSWORD, DevnetOptions, write_layout};
    use blyan_runtime::node::NodeSetup;
    let dir = tempfile::tempdir().unwrap();
    let opts = DevnetOptions::new(dir.path().join("devnet"), 1);
    let addrs = vec![("127.0.0.1:1".to_string(), "127.0.0.1:2".to_string())];
    let (_, configs) = write_layout(&opts, &addrs).unwrap();
    let mut c = FileConfig::load(&configs[0]).unwrap();
    c.key_password_env = "BLYAN_TEST_PASSWORD_NEVER_SET_9F2C".into();
    match NodeSetup::from_config(&c) {
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("password"), "{m}");
        }
        Ok(_) => panic!("a node started with no password given"),
    }
    let file = dir.path().join("password.txt");
    std::fs::write(&file, format!("{DEVNET_PASSWORD}\n")).unwrap();
    c.key_password_file = Some(file);
    let setup = NodeSetup::from_config(&c).unwrap();
    assert_eq!(
        blyan_state_machine::testkit::address(&setup.key),
        blyan_runtime::keystore::KeyFile::from_json(&std::fs::read_to_string(&c.key_file).unwrap())
            .unwrap()
            .address
    );
}
