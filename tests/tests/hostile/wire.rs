//! A protobuf wire-format model for structure-aware fuzzing: a valid message is split into its
//! fields, edited field by field (wrong wire types, lying lengths, overlong varints, garbage
//! strings, edits inside nested messages) and encoded again, so the bytes stay close enough to
//! valid that they reach deep into the decoder instead of failing at the first byte.

use proptest::prelude::*;

/// One field as it sits on the wire: its number, wire type and payload (for length-delimited
/// fields the bytes after the length; `len_delta` makes the written length lie).
#[derive(Debug, Clone)]
pub struct Field {
    pub number: u64,
    pub wire: u8,
    pub payload: Vec<u8>,
    pub len_delta: i64,
}

pub fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Splits a well-formed message into its top-level fields; `None` for bytes that are not one.
pub fn parse(b: &[u8]) -> Option<Vec<Field>> {
    let mut at = 0;
    let mut fields = Vec::new();
    while at < b.len() {
        let key = read_varint(b, &mut at)?;
        let (number, wire) = (key >> 3, (key & 7) as u8);
        let start = at;
        let payload = match wire {
            0 => {
                read_varint(b, &mut at)?;
                b[start..at].to_vec()
            }
            1 => b.get(at..at + 8).inspect(|_| at += 8)?.to_vec(),
            5 => b.get(at..at + 4).inspect(|_| at += 4)?.to_vec(),
            2 => {
                let len = usize::try_from(read_varint(b, &mut at)?).ok()?;
                let p = b.get(at..at.checked_add(len)?)?.to_vec();
                at += len;
                p
            }
            _ => return None,
        };
        fields.push(Field { number, wire, payload, len_delta: 0 });
    }
    Some(fields)
}

pub fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        varint((f.number << 3) | u64::from(f.wire & 7), &mut out);
        if f.wire == 2 {
            varint((f.payload.len() as i64).saturating_add(f.len_delta).max(0) as u64, &mut out);
        }
        out.extend_from_slice(&f.payload);
    }
    out
}

/// One edit of a message. Indexes pick a field modulo the field count.
#[derive(Debug, Clone)]
pub enum Edit {
    Drop(usize),
    Duplicate(usize),
    /// The field becomes a varint of this value (a type confusion when it was not one).
    Varint(usize, u64),
    /// The field keeps its payload under another wire type (including the invalid 3, 4, 6, 7).
    WireType(usize, u8),
    /// The field becomes length-delimited with these bytes.
    Bytes(usize, Vec<u8>),
    /// Bytes that are not UTF-8 where a string may sit.
    NotUtf8(usize),
    /// The written length is off by this much.
    LengthLie(usize, i64),
    /// A varint longer than ten bytes.
    OverlongVarint(usize),
    /// A field number this message does not have (or the invalid 0, or the largest).
    Unknown(u64, u8, Vec<u8>),
    /// An edit inside a nested message (a length-delimited field that parses as one).
    Inside(usize, Box<Edit>),
}

pub fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let leaf = prop_oneof![
        any::<usize>().prop_map(Edit::Drop),
        any::<usize>().prop_map(Edit::Duplicate),
        (
            any::<usize>(),
            prop_oneof![Just(0u64), Just(u64::MAX), Just(1 << 63), Just(u64::from(u32::MAX) + 1), any::<u64>()]
        )
            .prop_map(|(i, v)| Edit::Varint(i, v)),
        (any::<usize>(), 0u8..8).prop_map(|(i, w)| Edit::WireType(i, w)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(i, b)| Edit::Bytes(i, b)),
        any::<usize>().prop_map(Edit::NotUtf8),
        (any::<usize>(), prop_oneof![-3i64..3, Just(1 << 20), Just(i64::from(i32::MAX)), Just(-1000)])
            .prop_map(|(i, d)| Edit::LengthLie(i, d)),
        any::<usize>().prop_map(Edit::OverlongVarint),
        (
            prop_oneof![1u64..64, Just(0), Just((1 << 29) - 1), Just(1 << 40)],
            0u8..6,
            proptest::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(n, w, b)| Edit::Unknown(n, w, b)),
    ];
    let edit =
        leaf.prop_recursive(3, 12, 1, |inner| (any::<usize>(), inner).prop_map(|(i, e)| Edit::Inside(i, Box::new(e))));
    proptest::collection::vec(edit, 1..5)
}

/// Applies `edits` to the fields of `seed` and encodes the result.
pub fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut fields = parse(seed).expect("seeds are valid messages");
    for e in edits {
        apply(&mut fields, e);
    }
    encode(&fields)
}

fn apply(fields: &mut Vec<Field>, edit: &Edit) {
    if let Edit::Unknown(number, wire, payload) = edit {
        fields.push(Field { number: *number, wire: *wire, payload: payload.clone(), len_delta: 0 });
        return;
    }
    if fields.is_empty() {
        return;
    }
    let n = fields.len();
    let pick = |i: &usize| i % n;
    match edit {
        Edit::Drop(i) => {
            fields.remove(pick(i));
        }
        Edit::Duplicate(i) => {
            let f = fields[pick(i)].clone();
            fields.push(f);
        }
        Edit::Varint(i, v) => {
            let f = &mut fields[pick(i)];
            f.wire = 0;
            f.payload.clear();
            varint(*v, &mut f.payload);
        }
        Edit::WireType(i, w) => fields[pick(i)].wire = *w,
        Edit::Bytes(i, b) => {
            let f = &mut fields[pick(i)];
            f.wire = 2;
            f.payload = b.clone();
        }
        Edit::NotUtf8(i) => {
            let f = &mut fields[pick(i)];
            f.wire = 2;
            f.payload = vec![b'a', 0xff, 0xfe, 0xc3, 0x28, 0xed, 0xa0, 0x80];
        }
        Edit::LengthLie(i, d) => {
            let f = &mut fields[pick(i)];
            f.wire = 2;
            f.len_delta = *d;
        }
        Edit::OverlongVarint(i) => {
            let f = &mut fields[pick(i)];
            f.wire = 0;
            f.payload = vec![0xff; 11];
        }
        Edit::Inside(i, inner) => {
            let f = &mut fields[pick(i)];
            if f.wire == 2
                && let Some(mut nested) = parse(&f.payload)
            {
                apply(&mut nested, inner);
                f.payload = encode(&nested);
            }
        }
        Edit::Unknown(..) => unreachable!("handled above"),
    }
}

#[test]
fn parse_and_encode_round_trip() {
    let mut b = Vec::new();
    varint((1 << 3) | 2, &mut b);
    varint(3, &mut b);
    b.extend_from_slice(b"abc");
    varint(2 << 3, &mut b);
    varint(300, &mut b);
    let fields = parse(&b).expect("valid");
    assert_eq!(fields.len(), 2);
    assert_eq!(encode(&fields), b);
}
