//! RFC 9381 ECVRF (spec/consensus.md, CONS-VRF-*), written once for any
//! prime-order curve with 32-byte field elements and SHA-256:
//! try-and-increment encode-to-curve (§5.4.1.1), RFC 6979 nonces (§5.4.2.1),
//! challenge generation (§5.4.3), prove (§5.1), proof to hash (§5.2) and
//! verify with key validation (§5.3, §5.4.5).
//!
//! Suites: [`Secp256k1Sha256Tai`] is the protocol's (CONS-VRF-3); RFC 9381's
//! `ECVRF-P256-SHA256-TAI` is defined in the tests only, to check this code
//! against the RFC's published vectors.
//!
//! Deliberately absent: key generation (keys come from the keystore), batch
//! verification, the elligator2/SSWU variants, curves with a cofactor.

use elliptic_curve::consts::U32;
use elliptic_curve::group::Curve as _;
use elliptic_curve::ops::Reduce;
use elliptic_curve::sec1::{EncodedPoint, FromEncodedPoint, ToEncodedPoint};
use elliptic_curve::{
    CurveArithmetic, FieldBytes, FieldBytesEncoding, Group, PrimeCurve, PrimeField,
};
use sha2::{Digest, Sha256};

/// `ptLen`: a SEC1 compressed point (tag byte and the 32-byte x coordinate).
pub const POINT_LEN: usize = 33;
/// `cLen`: the challenge is the first 16 bytes of a SHA-256 digest.
pub const CHALLENGE_LEN: usize = 16;
/// `qLen`: a scalar, big-endian.
pub const SCALAR_LEN: usize = 32;
/// A proof `pi = point_to_string(Gamma) ‖ c (16) ‖ s (32)` (CONS-VRF-1).
pub const PROOF_LEN: usize = POINT_LEN + CHALLENGE_LEN + SCALAR_LEN;

/// A VRF proof (`pi_string`, 81 bytes).
pub type VrfProof = [u8; PROOF_LEN];
/// A VRF output (`beta_string`, a SHA-256 digest).
pub type VrfOutput = [u8; 32];
/// A VRF public key: SEC1 compressed `x·B` (`PK_string`).
pub type VrfPublicKey = [u8; POINT_LEN];

// RFC 9381 domain separators (§5.2, §5.4.1.1, §5.4.3).
const ENCODE_FRONT: u8 = 0x01;
const CHALLENGE_FRONT: u8 = 0x02;
const PROOF_TO_HASH_FRONT: u8 = 0x03;
const BACK: u8 = 0x00;

/// Why a VRF operation failed. Every failure of [`verify`] means "INVALID" in
/// the RFC's terms; the variants say which check rejected the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VrfError {
    #[error("the secret key is not a scalar in [1, q-1]")]
    InvalidSecretKey,
    #[error(
        "the public key is not a compressed point of the curve's group other than the identity"
    )]
    InvalidPublicKey,
    #[error("the proof is not {PROOF_LEN} bytes, Gamma is not a valid point, or s is not below q")]
    MalformedProof,
    #[error("the proof does not verify for this public key and input")]
    InvalidProof,
    #[error("try-and-increment found no curve point in 256 attempts")]
    EncodeToCurveFailed,
}

/// The curves the ECVRF is written for: prime order (cofactor 1, so every
/// "cofactor·P" of the RFC is `P`), 32-byte field elements and scalars (`qLen
/// = fLen = 32`, matching SHA-256's output for RFC 6979), and SEC1 encoding.
/// k256 0.13 and p256 0.13 both qualify.
pub trait VrfCurve:
    PrimeCurve
    + CurveArithmetic<AffinePoint: FromEncodedPoint<Self> + ToEncodedPoint<Self>>
    + elliptic_curve::Curve<FieldBytesSize = U32>
{
}

impl<C> VrfCurve for C
where
    C: PrimeCurve + CurveArithmetic + elliptic_curve::Curve<FieldBytesSize = U32>,
    C::AffinePoint: FromEncodedPoint<C> + ToEncodedPoint<C>,
{
}

/// An ECVRF ciphersuite (RFC 9381 §5.5): a curve and its `suite_string`. The
/// hash is always SHA-256, the encoding to the curve always try-and-increment
/// (`*_TAI`), the salt always `PK_string`.
pub trait Suite {
    type Curve: VrfCurve;
    /// The one-byte `suite_string` that starts every hash input.
    const SUITE_STRING: u8;
    /// The suite's name, for messages.
    const NAME: &'static str;
}

/// CONS-VRF-3: the protocol's suite, `ECVRF-SECP256K1-SHA256-TAI`: RFC 9381's
/// `ECVRF-P256-SHA256-TAI` with secp256k1 instead of P-256 and `suite_string`
/// 0xFE (no standard defines a secp256k1 suite; 0xFE is the value other
/// secp256k1 ECVRF implementations use, outside the RFC's 0x01..0x04).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Secp256k1Sha256Tai;

impl Suite for Secp256k1Sha256Tai {
    type Curve = k256::Secp256k1;
    const SUITE_STRING: u8 = 0xFE;
    const NAME: &'static str = "ECVRF-SECP256K1-SHA256-TAI";
}

type Scalar<S> = <<S as Suite>::Curve as CurveArithmetic>::Scalar;
type Point<S> = <<S as Suite>::Curve as CurveArithmetic>::ProjectivePoint;
type Affine<S> = <<S as Suite>::Curve as CurveArithmetic>::AffinePoint;

/// CONS-VRF-4: the secret scalar `x` from its 32 big-endian bytes: must be in `[1, q-1]`.
fn secret_scalar<S: Suite>(secret_key: &[u8; 32]) -> Result<Scalar<S>, VrfError> {
    let repr: FieldBytes<S::Curve> = (*secret_key).into();
    let x: Option<Scalar<S>> = Scalar::<S>::from_repr(repr).into();
    match x {
        Some(x) if !bool::from(elliptic_curve::Field::is_zero(&x)) => Ok(x),
        _ => Err(VrfError::InvalidSecretKey),
    }
}

/// `point_to_string`: SEC1 compressed. Callers never pass the identity.
fn point_to_string<S: Suite>(point: &Point<S>) -> [u8; POINT_LEN] {
    assert!(
        !bool::from(point.is_identity()),
        "the identity is never encoded"
    );
    let encoded = point.to_affine().to_encoded_point(true);
    let bytes = encoded.as_bytes();
    assert_eq!(bytes.len(), POINT_LEN, "a compressed 32-byte-field point");
    let mut out = [0u8; POINT_LEN];
    out.copy_from_slice(bytes);
    out
}

/// `string_to_point` (CONS-VRF-2): exactly 33 bytes, tag 0x02 or 0x03, `x < p`,
/// on the curve; the identity cannot be encoded this way and is rejected anyway.
fn string_to_point<S: Suite>(bytes: &[u8]) -> Option<Point<S>> {
    if bytes.len() != POINT_LEN || (bytes[0] != 0x02 && bytes[0] != 0x03) {
        return None;
    }
    let encoded = EncodedPoint::<S::Curve>::from_bytes(bytes).ok()?;
    let affine: Option<Affine<S>> = Affine::<S>::from_encoded_point(&encoded).into();
    let point = Point::<S>::from(affine?);
    if bool::from(point.is_identity()) {
        return None;
    }
    Some(point)
}

/// The 32-byte big-endian encoding of a scalar (`int_to_string(s, qLen)`).
fn scalar_to_bytes<S: Suite>(scalar: &Scalar<S>) -> [u8; SCALAR_LEN] {
    scalar.to_repr().into()
}

/// The challenge `c` (16 bytes, big-endian) as a scalar: below 2^128 < q.
fn challenge_scalar<S: Suite>(c: &[u8; CHALLENGE_LEN]) -> Scalar<S> {
    let mut repr = [0u8; SCALAR_LEN];
    repr[SCALAR_LEN - CHALLENGE_LEN..].copy_from_slice(c);
    let scalar: Option<Scalar<S>> = Scalar::<S>::from_repr(repr.into()).into();
    scalar.expect("a 128-bit integer is below the 256-bit group order")
}

/// RFC 9381 §5.4.1.1 `ECVRF_encode_to_curve_try_and_increment`, with
/// `encode_to_curve_salt = PK_string`: the first `ctr` in 0..=255 for which
/// `0x02 ‖ SHA-256(suite ‖ 0x01 ‖ PK ‖ alpha ‖ ctr ‖ 0x00)` decodes to a point.
pub fn encode_to_curve<S: Suite>(
    public_key: &VrfPublicKey,
    alpha: &[u8],
) -> Result<[u8; POINT_LEN], VrfError> {
    encode_to_curve_point::<S>(public_key, alpha).map(|h| point_to_string::<S>(&h))
}

fn encode_to_curve_point<S: Suite>(
    public_key: &VrfPublicKey,
    alpha: &[u8],
) -> Result<Point<S>, VrfError> {
    for ctr in 0..=u8::MAX {
        let digest = Sha256::new()
            .chain_update([S::SUITE_STRING, ENCODE_FRONT])
            .chain_update(public_key)
            .chain_update(alpha)
            .chain_update([ctr, BACK])
            .finalize();
        // `interpret_hash_value_as_a_point(s) = string_to_point(0x02 ‖ s)`.
        let mut candidate = [0u8; POINT_LEN];
        candidate[0] = 0x02;
        candidate[1..].copy_from_slice(&digest);
        // Cofactor 1: `cofactor·H = H`; string_to_point never yields the identity.
        if let Some(h) = string_to_point::<S>(&candidate) {
            return Ok(h);
        }
    }
    // Each attempt succeeds with probability about 1/2: unreachable in practice.
    Err(VrfError::EncodeToCurveFailed)
}

/// RFC 9381 §5.4.2.1: `k` by RFC 6979 §3.2 with SHA-256, `x = SK` and the
/// message `h_string`, i.e. `h1 = SHA-256(h_string)`, reduced mod q (`bits2octets`).
fn nonce<S: Suite>(x: &Scalar<S>, h_string: &[u8; POINT_LEN]) -> Scalar<S> {
    let h1: FieldBytes<S::Curve> = Sha256::digest(h_string);
    // qlen = hlen = 256: bits2int(h1) = h1; bits2octets reduces it mod q once.
    let h1_mod_q =
        <Scalar<S> as Reduce<<S::Curve as elliptic_curve::Curve>::Uint>>::reduce_bytes(&h1);
    let order: FieldBytes<S::Curve> =
        <S::Curve as elliptic_curve::Curve>::ORDER.encode_field_bytes();
    let k = rfc6979::generate_k::<Sha256, U32>(&x.to_repr(), &order, &h1_mod_q.to_repr(), &[]);
    let k: Option<Scalar<S>> = Scalar::<S>::from_repr(k).into();
    let k = k.expect("RFC 6979 returns k in [1, q-1]");
    assert!(
        !bool::from(elliptic_curve::Field::is_zero(&k)),
        "RFC 6979 never returns 0"
    );
    k
}

/// RFC 9381 §5.4.3: `c = first 16 bytes of SHA-256(suite ‖ 0x02 ‖ Y ‖ H ‖ Gamma ‖ U ‖ V ‖ 0x00)`.
fn challenge<S: Suite>(points: [&[u8; POINT_LEN]; 5]) -> [u8; CHALLENGE_LEN] {
    let mut hasher = Sha256::new().chain_update([S::SUITE_STRING, CHALLENGE_FRONT]);
    for point in points {
        hasher.update(point);
    }
    let digest = hasher.chain_update([BACK]).finalize();
    let mut c = [0u8; CHALLENGE_LEN];
    c.copy_from_slice(&digest[..CHALLENGE_LEN]);
    c
}

/// CONS-VRF-4: the public key `PK_string = point_to_string(x·B)` of a secret key.
pub fn public_key<S: Suite>(secret_key: &[u8; 32]) -> Result<VrfPublicKey, VrfError> {
    let x = secret_scalar::<S>(secret_key)?;
    Ok(point_to_string::<S>(&(Point::<S>::generator() * x)))
}

/// RFC 9381 §5.1 `ECVRF_prove`: the proof `pi` that `beta` is the VRF output
/// of `alpha` under `secret_key`. Deterministic: the same key and input give
/// the same proof.
pub fn prove<S: Suite>(secret_key: &[u8; 32], alpha: &[u8]) -> Result<VrfProof, VrfError> {
    let x = secret_scalar::<S>(secret_key)?;
    let y = Point::<S>::generator() * x;
    let y_string = point_to_string::<S>(&y);
    let h = encode_to_curve_point::<S>(&y_string, alpha)?;
    let h_string = point_to_string::<S>(&h);
    let gamma = h * x;
    let k = nonce::<S>(&x, &h_string);
    let u = Point::<S>::generator() * k;
    let v = h * k;
    let c = challenge::<S>([
        &y_string,
        &h_string,
        &point_to_string::<S>(&gamma),
        &point_to_string::<S>(&u),
        &point_to_string::<S>(&v),
    ]);
    let s = k + challenge_scalar::<S>(&c) * x;
    let mut pi = [0u8; PROOF_LEN];
    pi[..POINT_LEN].copy_from_slice(&point_to_string::<S>(&gamma));
    pi[POINT_LEN..POINT_LEN + CHALLENGE_LEN].copy_from_slice(&c);
    pi[POINT_LEN + CHALLENGE_LEN..].copy_from_slice(&scalar_to_bytes::<S>(&s));
    Ok(pi)
}

/// A decoded proof: `(Gamma, c, s)`.
struct Decoded<S: Suite> {
    gamma: Point<S>,
    c: [u8; CHALLENGE_LEN],
    s: Scalar<S>,
}

/// RFC 9381 §5.4.4 `ECVRF_decode_proof` (CONS-VRF-2): exactly 81 bytes, Gamma
/// a valid non-identity point, `s < q`.
fn decode_proof<S: Suite>(pi: &[u8]) -> Result<Decoded<S>, VrfError> {
    if pi.len() != PROOF_LEN {
        return Err(VrfError::MalformedProof);
    }
    let gamma = string_to_point::<S>(&pi[..POINT_LEN]).ok_or(VrfError::MalformedProof)?;
    let mut c = [0u8; CHALLENGE_LEN];
    c.copy_from_slice(&pi[POINT_LEN..POINT_LEN + CHALLENGE_LEN]);
    let mut s_bytes = [0u8; SCALAR_LEN];
    s_bytes.copy_from_slice(&pi[POINT_LEN + CHALLENGE_LEN..]);
    // `from_repr` accepts only canonical encodings: it rejects s ≥ q.
    let s: Option<Scalar<S>> = Scalar::<S>::from_repr(s_bytes.into()).into();
    let s = s.ok_or(VrfError::MalformedProof)?;
    Ok(Decoded { gamma, c, s })
}

/// RFC 9381 §5.2 step 5: `beta = SHA-256(suite ‖ 0x03 ‖ point_to_string(Gamma) ‖ 0x00)`.
fn gamma_to_hash<S: Suite>(gamma: &Point<S>) -> VrfOutput {
    Sha256::new()
        .chain_update([S::SUITE_STRING, PROOF_TO_HASH_FRONT])
        .chain_update(point_to_string::<S>(gamma))
        .chain_update([BACK])
        .finalize()
        .into()
}

/// RFC 9381 §5.2 `ECVRF_proof_to_hash`: the output `beta` of a proof, without
/// verifying it. Only for proofs already verified (or made by [`prove`]);
/// anything received must go through [`verify`], which returns the same output.
pub fn proof_to_hash<S: Suite>(pi: &[u8]) -> Result<VrfOutput, VrfError> {
    decode_proof::<S>(pi).map(|d| gamma_to_hash::<S>(&d.gamma))
}

/// RFC 9381 §5.4.5 `ECVRF_validate_key` (CONS-VRF-2): the public key decodes
/// to a point of the group other than the identity (cofactor 1, so the RFC's
/// `cofactor·Y ≠ identity` is `Y ≠ identity`).
pub fn validate_key<S: Suite>(public_key: &[u8]) -> Result<(), VrfError> {
    string_to_point::<S>(public_key)
        .map(|_| ())
        .ok_or(VrfError::InvalidPublicKey)
}

/// RFC 9381 §5.3 `ECVRF_verify` with `validate_key = TRUE` (CONS-VRF-2): the
/// VRF output `beta` of `alpha` under `public_key` if `pi` proves it, an error
/// otherwise. Any input is accepted: malformed keys and proofs are errors, never panics.
pub fn verify<S: Suite>(public_key: &[u8], alpha: &[u8], pi: &[u8]) -> Result<VrfOutput, VrfError> {
    // Steps 1–3: decode and validate the key.
    let y = string_to_point::<S>(public_key).ok_or(VrfError::InvalidPublicKey)?;
    let y_string = point_to_string::<S>(&y);
    assert_eq!(
        &y_string[..],
        public_key,
        "compressed encodings are canonical"
    );
    // Steps 4–6.
    let Decoded { gamma, c, s } = decode_proof::<S>(pi)?;
    // Step 7.
    let h = encode_to_curve_point::<S>(&y_string, alpha)?;
    // Steps 8–9: U = s·B − c·Y, V = s·H − c·Gamma.
    let c_scalar = challenge_scalar::<S>(&c);
    let u = Point::<S>::generator() * s - y * c_scalar;
    let v = h * s - gamma * c_scalar;
    // U or V is the identity only for a forged proof (or with negligible
    // probability); the identity has no 33-byte encoding, so reject.
    if bool::from(u.is_identity()) || bool::from(v.is_identity()) {
        return Err(VrfError::InvalidProof);
    }
    // Steps 10–11.
    let expected = challenge::<S>([
        &y_string,
        &point_to_string::<S>(&h),
        &point_to_string::<S>(&gamma),
        &point_to_string::<S>(&u),
        &point_to_string::<S>(&v),
    ]);
    if expected != c {
        return Err(VrfError::InvalidProof);
    }
    Ok(gamma_to_hash::<S>(&gamma))
}

#[cfg(test)]
mod tests {
    use super::*;

    type K1 = Secp256k1Sha256Tai;

    fn sk(byte: u8) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[31] = byte;
        out[0] = 0x11;
        out
    }

    #[test]
    fn cons_vrf_1_prove_verify_roundtrip_and_determinism() {
        let key = sk(1);
        let pk = public_key::<K1>(&key).unwrap();
        for alpha in [&b""[..], b"a", &[0u8; 300]] {
            let pi = prove::<K1>(&key, alpha).unwrap();
            assert_eq!(pi, prove::<K1>(&key, alpha).unwrap(), "deterministic");
            let beta = verify::<K1>(&pk, alpha, &pi).unwrap();
            assert_eq!(beta, proof_to_hash::<K1>(&pi).unwrap());
        }
    }

    #[test]
    fn cons_vrf_1_outputs_differ_by_key_and_input() {
        let (a, b) = (sk(1), sk(2));
        let beta = |key: &[u8; 32], alpha: &[u8]| {
            proof_to_hash::<K1>(&prove::<K1>(key, alpha).unwrap()).unwrap()
        };
        assert_ne!(beta(&a, b"x"), beta(&b, b"x"));
        assert_ne!(beta(&a, b"x"), beta(&a, b"y"));
    }

    #[test]
    fn cons_vrf_4_secret_key_range() {
        assert_eq!(
            public_key::<K1>(&[0u8; 32]),
            Err(VrfError::InvalidSecretKey)
        );
        assert_eq!(
            prove::<K1>(&[0xff; 32], b""),
            Err(VrfError::InvalidSecretKey)
        );
        // q itself is not a scalar; q - 1 is.
        let order: [u8; 32] = <k256::Secp256k1 as elliptic_curve::Curve>::ORDER
            .encode_field_bytes()
            .into();
        assert_eq!(public_key::<K1>(&order), Err(VrfError::InvalidSecretKey));
        let mut q_minus_1 = order;
        q_minus_1[31] -= 1;
        let pk = public_key::<K1>(&q_minus_1).unwrap();
        // (q-1)·B = −B: the generator's x coordinate, the opposite parity.
        let one = {
            let mut one = [0u8; 32];
            one[31] = 1;
            public_key::<K1>(&one).unwrap()
        };
        assert_eq!(pk[1..], one[1..]);
        assert_ne!(pk[0], one[0]);
    }

    #[test]
    fn cons_vrf_2_rejects_malformed_keys() {
        let key = sk(3);
        let pi = prove::<K1>(&key, b"m").unwrap();
        let pk = public_key::<K1>(&key).unwrap();
        let mut uncompressed = vec![0x04];
        uncompressed.extend_from_slice(&[0u8; 64]);
        // The smallest x with no point on the curve (x³ + 7 not a square mod p).
        let off_curve = (1u8..=40)
            .map(|x| {
                let mut bytes = [0u8; 33];
                bytes[0] = 0x02;
                bytes[32] = x;
                bytes
            })
            .find(|bytes| string_to_point::<K1>(bytes).is_none())
            .expect("about half of all x have no point");
        let mut x_is_p = pk;
        x_is_p[1..].copy_from_slice(&hex_32(
            "fffffffffffffffffffffffffffffffffffffffffffffffffffffffefffffc2f",
        ));
        for bad in [
            &[][..],
            &[0x00][..],
            &pk[..32],
            &uncompressed[..],
            &off_curve[..],
            &x_is_p[..],
            &[0x05; 33][..],
        ] {
            assert_eq!(
                validate_key::<K1>(bad),
                Err(VrfError::InvalidPublicKey),
                "{bad:02x?}"
            );
            assert_eq!(
                verify::<K1>(bad, b"m", &pi),
                Err(VrfError::InvalidPublicKey)
            );
        }
        assert_eq!(validate_key::<K1>(&pk), Ok(()));
    }

    #[test]
    fn cons_vrf_2_rejects_malformed_proofs() {
        let key = sk(4);
        let pk = public_key::<K1>(&key).unwrap();
        let pi = prove::<K1>(&key, b"m").unwrap();
        // Wrong lengths.
        assert_eq!(
            verify::<K1>(&pk, b"m", &pi[..80]),
            Err(VrfError::MalformedProof)
        );
        let mut long = pi.to_vec();
        long.push(0);
        assert_eq!(
            verify::<K1>(&pk, b"m", &long),
            Err(VrfError::MalformedProof)
        );
        // Gamma not a point (tag 0x00, 0x04) or x not on the curve.
        for tag in [0x00, 0x04] {
            let mut bad = pi;
            bad[0] = tag;
            assert_eq!(verify::<K1>(&pk, b"m", &bad), Err(VrfError::MalformedProof));
        }
        for x in 1u8..=40 {
            let mut bad = pi;
            bad[1..POINT_LEN].fill(0);
            bad[POINT_LEN - 1] = x;
            if string_to_point::<K1>(&bad[..POINT_LEN]).is_none() {
                assert_eq!(verify::<K1>(&pk, b"m", &bad), Err(VrfError::MalformedProof));
            }
        }
        // s ≥ q.
        let mut bad = pi;
        bad[POINT_LEN + CHALLENGE_LEN..].fill(0xff);
        assert_eq!(verify::<K1>(&pk, b"m", &bad), Err(VrfError::MalformedProof));
        assert_eq!(proof_to_hash::<K1>(&bad), Err(VrfError::MalformedProof));
        // Every single-bit flip is rejected.
        for byte in 0..PROOF_LEN {
            let mut bad = pi;
            bad[byte] ^= 0x01;
            assert!(
                verify::<K1>(&pk, b"m", &bad).is_err(),
                "flip in byte {byte}"
            );
        }
    }

    #[test]
    fn cons_vrf_2_rejects_wrong_key_and_input() {
        let (a, b) = (sk(5), sk(6));
        let pi = prove::<K1>(&a, b"m").unwrap();
        let pk_b = public_key::<K1>(&b).unwrap();
        let pk_a = public_key::<K1>(&a).unwrap();
        assert_eq!(verify::<K1>(&pk_b, b"m", &pi), Err(VrfError::InvalidProof));
        assert_eq!(verify::<K1>(&pk_a, b"n", &pi), Err(VrfError::InvalidProof));
        assert_eq!(verify::<K1>(&pk_a, b"", &pi), Err(VrfError::InvalidProof));
        // c = 0, s = 0 with any Gamma: U = V = identity, rejected.
        let mut zero = pi;
        zero[POINT_LEN..].fill(0);
        assert_eq!(
            verify::<K1>(&pk_a, b"m", &zero),
            Err(VrfError::InvalidProof)
        );
    }

    #[test]
    fn cons_vrf_1_encode_to_curve_is_deterministic_and_salted() {
        let pk_a = public_key::<K1>(&sk(7)).unwrap();
        let pk_b = public_key::<K1>(&sk(8)).unwrap();
        let h = encode_to_curve::<K1>(&pk_a, b"x").unwrap();
        assert_eq!(h, encode_to_curve::<K1>(&pk_a, b"x").unwrap());
        assert_ne!(h, encode_to_curve::<K1>(&pk_b, b"x").unwrap());
        assert_eq!(h[0], 0x02, "try-and-increment always picks the even y");
    }

    fn hex_32(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }
}
