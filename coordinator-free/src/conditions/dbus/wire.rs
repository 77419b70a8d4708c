//! The D-Bus wire format, sans IO: a method call's bytes, and a received message's length and
//! contents. Laid out as the D-Bus specification says: a 16-byte fixed header, an `a(yv)` array
//! of header fields, padding to 8 bytes, then the body, each value aligned to its size. Calls go
//! out little-endian; messages are read in either byte order. Everything read is untrusted: a
//! message is at most [`MAX_MESSAGE`] bytes (refused from its first 16, before anything is
//! allocated), has at most [`MAX_FIELDS`] header fields, and every length and offset is checked.

use super::BusError;

/// Largest message accepted, header and body; the replies asked for are well under 1 KiB.
pub const MAX_MESSAGE: usize = 64 << 10;
/// Most header fields in a message; the specification defines ten.
const MAX_FIELDS: usize = 16;

pub const METHOD_CALL: u8 = 1;
pub const METHOD_RETURN: u8 = 2;
pub const ERROR: u8 = 3;
/// The worker only reads: asking must never make the bus start a service on its behalf.
const NO_AUTO_START: u8 = 0x2;

/// A value in a reply; a variant is unwrapped to what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Bool(bool),
    U32(u32),
    U64(u64),
    /// A string, object path or signature.
    Str(String),
}

/// A method call to encode.
#[derive(Debug, Clone, Copy)]
pub struct CallSpec<'a> {
    pub destination: &'a str,
    pub path: &'a str,
    pub interface: &'a str,
    pub member: &'a str,
    pub args: &'a [&'a str],
}

/// A method call's bytes: fixed header, the fields PATH, INTERFACE, MEMBER, DESTINATION and
/// (with arguments) SIGNATURE, then one string per argument.
pub fn method_call(serial: u32, call: &CallSpec<'_>) -> Result<Vec<u8>, BusError> {
    let strings = [call.destination, call.path, call.interface, call.member];
    let all = strings.iter().chain(call.args);
    if all.clone().any(|s| s.contains('\0')) {
        return Err(BusError::Unencodable("a NUL byte in a string"));
    }
    if all.map(|s| s.len()).sum::<usize>() > MAX_MESSAGE {
        return Err(BusError::Unencodable("longer than a message may be"));
    }
    let signature = "s".repeat(call.args.len());
    if signature.len() > 255 {
        return Err(BusError::Unencodable("more than 255 arguments"));
    }

    let mut body = Writer::default();
    for arg in call.args {
        body.string(arg);
    }
    let mut out = Writer::default();
    out.bytes
        .extend_from_slice(&[b'l', METHOD_CALL, NO_AUTO_START, 1]);
    out.u32(len_u32(body.bytes.len())?);
    out.u32(serial);
    out.u32(0); // the fields' length, filled in below
    let field = |out: &mut Writer, code: u8, kind: u8| {
        out.pad(8);
        out.bytes.extend_from_slice(&[code, 1, kind, 0]);
    };
    field(&mut out, 1, b'o');
    out.string(call.path);
    field(&mut out, 2, b's');
    out.string(call.interface);
    field(&mut out, 3, b's');
    out.string(call.member);
    field(&mut out, 6, b's');
    out.string(call.destination);
    if !call.args.is_empty() {
        field(&mut out, 8, b'g');
        out.signature(&signature);
    }
    let fields_len = len_u32(out.bytes.len() - 16)?;
    out.bytes[12..16].copy_from_slice(&fields_len.to_le_bytes());
    out.pad(8);
    out.bytes.extend_from_slice(&body.bytes);
    if out.bytes.len() > MAX_MESSAGE {
        return Err(BusError::Unencodable("longer than a message may be"));
    }
    Ok(out.bytes)
}

fn len_u32(len: usize) -> Result<u32, BusError> {
    u32::try_from(len).map_err(|_| BusError::Unencodable("longer than a message may be"))
}

/// Little-endian marshalling; alignment is from the start of the message (or of the body,
/// which starts on an 8-byte boundary).
#[derive(Debug, Default)]
struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn pad(&mut self, align: usize) {
        let to = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(to, 0);
    }

    fn u32(&mut self, value: u32) {
        self.pad(4);
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// Callers have checked the length fits.
    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.bytes.extend_from_slice(s.as_bytes());
        self.bytes.push(0);
    }

    /// Callers have checked the length is under 256.
    fn signature(&mut self, s: &str) {
        self.bytes.push(s.len() as u8);
        self.bytes.extend_from_slice(s.as_bytes());
        self.bytes.push(0);
    }
}

/// What the client needs of a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    reply_serial: Option<u32>,
    error_name: Option<String>,
    /// The body's value: `None` when empty or not one this client reads (only replies are
    /// read, and only theirs is checked).
    body: Result<Option<Value>, &'static str>,
}

impl Message {
    /// The answer this message gives to call `serial`, or `None` if it is not its reply.
    pub fn answer_to(self, serial: u32) -> Option<Result<Option<Value>, BusError>> {
        if self.reply_serial != Some(serial) {
            return None;
        }
        match self.kind {
            METHOD_RETURN => Some(self.body.map_err(BusError::Malformed)),
            ERROR => Some(Err(BusError::Failed {
                name: self.error_name.unwrap_or_default(),
            })),
            _ => None,
        }
    }
}

/// The whole length of a message from its first 16 bytes, refused if over [`MAX_MESSAGE`].
pub fn message_len(prefix: &[u8; 16]) -> Result<usize, BusError> {
    let big = big_endian(prefix[0])?;
    if prefix[3] != 1 {
        return Err(BusError::Malformed("a protocol version other than 1"));
    }
    let word = |at: usize| {
        let bytes = [prefix[at], prefix[at + 1], prefix[at + 2], prefix[at + 3]];
        u64::from(if big {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    };
    let (body_len, fields_len) = (word(4), word(12));
    let len = (16 + fields_len).next_multiple_of(8) + body_len;
    match usize::try_from(len) {
        Ok(len) if len <= MAX_MESSAGE => Ok(len),
        _ => Err(BusError::TooLarge { len }),
    }
}

fn big_endian(flag: u8) -> Result<bool, BusError> {
    match flag {
        b'l' => Ok(false),
        b'B' => Ok(true),
        _ => Err(BusError::Malformed("an unknown byte order")),
    }
}

/// A whole message, exactly [`message_len`] bytes.
pub fn parse(bytes: &[u8]) -> Result<Message, BusError> {
    let prefix: &[u8; 16] = bytes
        .get(..16)
        .and_then(|p| p.try_into().ok())
        .ok_or(BusError::Malformed("shorter than a header"))?;
    if message_len(prefix)? != bytes.len() {
        return Err(BusError::Malformed("a length other than its header says"));
    }
    let big = big_endian(bytes[0])?;
    let kind = bytes[1];
    let mut header = Cursor::new(bytes, big);
    header.at = 8;
    if header.u32()? == 0 {
        return Err(BusError::Malformed("serial 0"));
    }
    let fields_end = 16 + header.u32()? as usize;
    let body_start = fields_end.next_multiple_of(8);
    // Both lie within the message: `message_len` added them up to its length.
    let mut fields = Cursor::new(&bytes[..fields_end], big);
    fields.at = 16;
    let mut reply_serial = None;
    let mut error_name = None;
    let mut signature: &[u8] = b"";
    let mut count = 0;
    while fields.at < fields_end {
        count += 1;
        if count > MAX_FIELDS {
            return Err(BusError::Malformed("too many header fields"));
        }
        fields.align(8)?;
        let code = fields.u8()?;
        let &[kind] = fields.signature()? else {
            return Err(BusError::Malformed("a header field of a container type"));
        };
        match (code, kind) {
            (4, b's') => error_name = Some(fields.string()?.to_string()),
            (5, b'u') => reply_serial = Some(fields.u32()?),
            (8, b'g') => signature = fields.signature()?,
            (1, b'o') | (2 | 3 | 6 | 7, b's') | (9, b'u') => fields.skip(kind)?,
            (1..=9, _) => return Err(BusError::Malformed("a header field of the wrong type")),
            // Fields defined later are ignored, as the specification asks.
            _ => fields.skip(kind)?,
        }
    }
    let body_bytes = &bytes[body_start..];
    if signature.is_empty() && !body_bytes.is_empty() {
        return Err(BusError::Malformed("a body without a signature"));
    }
    let body = match kind {
        METHOD_RETURN => body_value(signature, body_bytes, big),
        _ => Ok(None),
    };
    Ok(Message {
        kind,
        reply_serial,
        error_name,
        body,
    })
}

/// The one value of a reply's body: a basic value or a variant holding one.
fn body_value(signature: &[u8], body: &[u8], big: bool) -> Result<Option<Value>, &'static str> {
    let mut cursor = Cursor::new(body, big);
    let value = match signature {
        [] => return Ok(None),
        [b'v'] => {
            let &[inner] = cursor.signature().map_err(reason)? else {
                return Err("a variant of a container type");
            };
            if inner == b'v' {
                return Err("a variant inside a variant");
            }
            cursor.value(inner)
        }
        &[kind] => cursor.value(kind),
        _ => return Err("a reply of more than one value"),
    }
    .map_err(reason)?;
    if cursor.at != body.len() {
        return Err("bytes after the reply's value");
    }
    Ok(Some(value))
}

fn reason(error: BusError) -> &'static str {
    match error {
        BusError::Malformed(reason) => reason,
        _ => "unreadable",
    }
}

/// Reads values from untrusted bytes; every read checks its bounds.
#[derive(Debug)]
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    big: bool,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8], big: bool) -> Self {
        Self { bytes, at: 0, big }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BusError> {
        let taken = self
            .at
            .checked_add(n)
            .and_then(|end| self.bytes.get(self.at..end))
            .ok_or(BusError::Malformed("a length past the end"))?;
        self.at += n;
        Ok(taken)
    }

    /// Skips the padding to `align`, which must be zeroes.
    fn align(&mut self, align: usize) -> Result<(), BusError> {
        let padding = self.at.next_multiple_of(align) - self.at;
        if self.take(padding)?.iter().any(|&b| b != 0) {
            return Err(BusError::Malformed("padding that is not zero"));
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, BusError> {
        Ok(self.take(1)?[0])
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], BusError> {
        self.align(N)?;
        let mut bytes = [0u8; N];
        bytes.copy_from_slice(self.take(N)?);
        if self.big {
            bytes.reverse();
        }
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, BusError> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }

    fn u64(&mut self) -> Result<u64, BusError> {
        Ok(u64::from_le_bytes(self.fixed()?))
    }

    /// Bytes, then a NUL that must end them and may not occur within.
    fn terminated(&mut self, len: usize) -> Result<&'a [u8], BusError> {
        let text = self.take(len)?;
        if self.u8()? != 0 || text.contains(&0) {
            return Err(BusError::Malformed("a string not ended by its NUL"));
        }
        Ok(text)
    }

    fn string(&mut self) -> Result<&'a str, BusError> {
        let len = self.u32()? as usize;
        let text = self.terminated(len)?;
        std::str::from_utf8(text).map_err(|_| BusError::Malformed("a string not in UTF-8"))
    }

    fn signature(&mut self) -> Result<&'a [u8], BusError> {
        let len = usize::from(self.u8()?);
        self.terminated(len)
    }

    /// A basic value of type `kind` this client reads.
    fn value(&mut self, kind: u8) -> Result<Value, BusError> {
        Ok(match kind {
            b'b' => match self.u32()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return Err(BusError::Malformed("a boolean other than 0 or 1")),
            },
            b'u' => Value::U32(self.u32()?),
            b't' => Value::U64(self.u64()?),
            b's' | b'o' => Value::Str(self.string()?.to_string()),
            b'g' => Value::Str(
                std::str::from_utf8(self.signature()?)
                    .map_err(|_| BusError::Malformed("a signature not in ASCII"))?
                    .to_string(),
            ),
            _ => return Err(BusError::Malformed("a value of a type not read here")),
        })
    }

    /// Passes over a basic value of any type.
    fn skip(&mut self, kind: u8) -> Result<(), BusError> {
        let size = match kind {
            b'y' => 1,
            b'n' | b'q' => 2,
            b'b' | b'i' | b'u' | b'h' => 4,
            b'x' | b't' | b'd' => 8,
            b's' | b'o' => return self.string().map(drop),
            b'g' => return self.signature().map(drop),
            _ => return Err(BusError::Malformed("a header field of a container type")),
        };
        self.align(size)?;
        self.take(size).map(drop)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::conditions::dbus::{BUS_NAME, BUS_PATH, PROPERTIES};
    use proptest::prelude::*;

    /// The specification's wire format, written out by hand: a header field is aligned to 8,
    /// then its code, the signature of its variant (length, type, NUL) and the value.
    fn message(kind: u8, serial: u32, fields: &[(u8, u8, Vec<u8>)], body: &[u8]) -> Vec<u8> {
        let mut out = vec![b'l', kind, 0, 1];
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&serial.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for (code, ty, value) in fields {
            out.resize(out.len().next_multiple_of(8), 0);
            out.extend_from_slice(&[*code, 1, *ty, 0]);
            out.extend_from_slice(value);
        }
        let fields_len = out.len() as u32 - 16;
        out[12..16].copy_from_slice(&fields_len.to_le_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
        out.extend_from_slice(body);
        out
    }

    /// A string value at a 4-aligned offset: length, bytes, NUL.
    pub(crate) fn s(text: &str) -> Vec<u8> {
        let mut out = (text.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(text.as_bytes());
        out.push(0);
        out
    }

    pub(crate) fn g(signature: &str) -> Vec<u8> {
        let mut out = vec![signature.len() as u8];
        out.extend_from_slice(signature.as_bytes());
        out.push(0);
        out
    }

    pub(crate) fn u(value: u32) -> Vec<u8> {
        value.to_le_bytes().to_vec()
    }

    pub(crate) fn reply(reply_serial: u32, signature: &str, body: &[u8]) -> Vec<u8> {
        let mut fields = vec![(5, b'u', u(reply_serial))];
        if !signature.is_empty() {
            fields.push((8, b'g', g(signature)));
        }
        message(METHOD_RETURN, 1000 + reply_serial, &fields, body)
    }

    /// `org.freedesktop.DBus.NameAcquired`, which the bus sends after `Hello`.
    pub(crate) fn name_acquired() -> Vec<u8> {
        message(
            4,
            2,
            &[
                (1, b'o', s(BUS_PATH)),
                (2, b's', s(BUS_NAME)),
                (3, b's', s("NameAcquired")),
                (8, b'g', g("s")),
            ],
            &s(":1.42"),
        )
    }

    #[test]
    fn hello_is_marshalled_as_the_specification_lays_it_out() {
        let hello = CallSpec {
            destination: BUS_NAME,
            path: BUS_PATH,
            interface: BUS_NAME,
            member: "Hello",
            args: &[],
        };
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            // little-endian, METHOD_CALL, NO_AUTO_START, version 1; no body; serial 1;
            // 109 bytes of header fields.
            &[b'l', 1, 2, 1, 0, 0, 0, 0, 1, 0, 0, 0, 109, 0, 0, 0][..],
            // 16: PATH, signature "o", 21 bytes, the path and its NUL; ends at 46.
            &[1, 1, b'o', 0, 21, 0, 0, 0], b"/org/freedesktop/DBus\0",
            // padding to 48: INTERFACE "s", 20 bytes; ends at 77.
            &[0, 0], &[2, 1, b's', 0, 20, 0, 0, 0], b"org.freedesktop.DBus\0",
            // padding to 80: MEMBER "s", 5 bytes; ends at 94.
            &[0, 0, 0], &[3, 1, b's', 0, 5, 0, 0, 0], b"Hello\0",
            // padding to 96: DESTINATION "s", 20 bytes; ends at 125 = 16 + 109.
            &[0, 0], &[6, 1, b's', 0, 20, 0, 0, 0], b"org.freedesktop.DBus\0",
            // padding of the header to 128; no body.
            &[0, 0, 0],
        ]
        .concat();
        assert_eq!(method_call(1, &hello).expect("encodes"), expected);
    }

    #[test]
    fn string_arguments_get_a_signature_and_an_aligned_body() {
        let get = CallSpec {
            destination: "a.b",
            path: "/",
            interface: PROPERTIES,
            member: "Get",
            args: &["x.y", "IdleHint"],
        };
        let bytes = method_call(7, &get).expect("encodes");
        let len = message_len(bytes[..16].try_into().expect("16")).expect("length");
        assert_eq!(len, bytes.len());
        // Body: "x.y" at 0 (4 + 4 bytes), "IdleHint" at 8 (4 + 9 bytes): 21 bytes.
        #[rustfmt::skip]
        let body: Vec<u8> = [
            &[3, 0, 0, 0][..], b"x.y\0", &[8, 0, 0, 0], b"IdleHint\0",
        ]
        .concat();
        assert_eq!(&bytes[4..8], &21u32.to_le_bytes());
        assert!(bytes.ends_with(&body));
        assert_eq!(bytes.len() % 8, 21 % 8);
        // The header ends with SIGNATURE "ss".
        let header_end = bytes.len() - body.len();
        assert!(bytes[..header_end].ends_with(&[8, 1, b'g', 0, 2, b's', b's', 0]));
        assert_eq!(parse(&bytes).expect("parses").kind, METHOD_CALL);
        assert_eq!(&bytes[8..12], &7u32.to_le_bytes());

        let nul = CallSpec {
            args: &["a\0b"],
            ..get
        };
        assert!(matches!(
            method_call(1, &nul),
            Err(BusError::Unencodable(_))
        ));
    }

    #[test]
    fn replies_holding_variants_and_errors_are_read() {
        // A boolean in a variant: signature "b", a byte of padding, the u32 1.
        #[rustfmt::skip]
        let hint: Vec<u8> = [
            &[b'l', METHOD_RETURN, 1, 1, 8, 0, 0, 0, 9, 0, 0, 0, 15, 0, 0, 0][..],
            &[5, 1, b'u', 0, 3, 0, 0, 0],      // REPLY_SERIAL 3
            &[8, 1, b'g', 0, 1, b'v', 0, 0],   // SIGNATURE "v", then padding to 32
            &[1, b'b', 0, 0, 1, 0, 0, 0],      // variant "b": true
        ]
        .concat();
        let parsed = parse(&hint).expect("parses");
        assert_eq!(parsed.reply_serial, Some(3));
        assert_eq!(
            parsed.answer_to(3).expect("the reply").expect("ok"),
            Some(Value::Bool(true))
        );
        assert!(parse(&hint).expect("parses").answer_to(4).is_none());

        // A u64 in a variant: signature "t", padding to 8, the value.
        let mut since = g("t");
        since.extend_from_slice(&[0; 5]);
        since.extend_from_slice(&1_700_000_000_123_456u64.to_le_bytes());
        let parsed = parse(&reply(5, "v", &since)).expect("parses");
        assert_eq!(
            parsed.answer_to(5).expect("the reply").expect("ok"),
            Some(Value::U64(1_700_000_000_123_456))
        );
        let parsed = parse(&reply(6, "u", &u(1000))).expect("parses");
        assert_eq!(
            parsed.answer_to(6).expect("the reply").expect("ok"),
            Some(Value::U32(1000))
        );
        let empty = parse(&reply(8, "", &[])).expect("parses");
        assert_eq!(empty.answer_to(8).expect("the reply").expect("ok"), None);

        let error = message(
            ERROR,
            9,
            &[
                (4, b's', s("org.freedesktop.DBus.Error.ServiceUnknown")),
                (5, b'u', u(7)),
                (8, b'g', g("s")),
            ],
            &s("no such name"),
        );
        match parse(&error).expect("parses").answer_to(7) {
            Some(Err(BusError::Failed { name })) => {
                assert_eq!(name, "org.freedesktop.DBus.Error.ServiceUnknown");
            }
            other => panic!("an error reply, not {other:?}"),
        }
        // A signal is nobody's reply, even one that names a serial.
        let signal = parse(&name_acquired()).expect("parses");
        assert_eq!(signal.kind, 4);
        assert!(signal.answer_to(1).is_none());

        // The same reply big-endian.
        #[rustfmt::skip]
        let big: Vec<u8> = [
            &[b'B', METHOD_RETURN, 0, 1, 0, 0, 0, 4, 0, 0, 0, 9, 0, 0, 0, 15][..],
            &[5, 1, b'u', 0, 0, 0, 0, 3],      // REPLY_SERIAL 3
            &[8, 1, b'g', 0, 1, b'u', 0, 0],   // SIGNATURE "u"
            &[0, 0, 0x03, 0xe8],               // 1000
        ]
        .concat();
        assert_eq!(
            parse(&big)
                .expect("parses")
                .answer_to(3)
                .expect("reply")
                .expect("ok"),
            Some(Value::U32(1000))
        );
    }

    #[test]
    fn hostile_messages_are_refused_without_panicking() {
        let good = reply(3, "v", &[1, b'b', 0, 0, 1, 0, 0, 0]);
        assert!(parse(&good).is_ok());
        // Every truncation, and one byte too many.
        for len in 0..good.len() {
            assert!(parse(&good[..len]).is_err(), "{len} bytes");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(parse(&longer).is_err());

        let prefix = |bytes: &[u8]| -> [u8; 16] { bytes[..16].try_into().expect("16") };
        // A huge body or header length is refused from the first 16 bytes.
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            message_len(&prefix(&huge)),
            Err(BusError::TooLarge { .. })
        ));
        huge[4..8].copy_from_slice(&(MAX_MESSAGE as u32).to_le_bytes());
        assert!(matches!(
            message_len(&prefix(&huge)),
            Err(BusError::TooLarge { .. })
        ));
        let mut fields = good.clone();
        fields[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            message_len(&prefix(&fields)),
            Err(BusError::TooLarge { .. })
        ));

        let refused = |mutate: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            mutate(&mut bytes);
            parse(&bytes).is_err()
        };
        assert!(refused(&|b| b[0] = b'X'), "byte order");
        assert!(refused(&|b| b[3] = 2), "protocol version");
        assert!(refused(&|b| b[8..12].copy_from_slice(&[0; 4])), "serial 0");
        // A header field's variant signature longer than the fields.
        assert!(refused(&|b| b[17] = 200), "signature length");
        // A header field of a container type.
        assert!(
            refused(&|b| b[17..20].copy_from_slice(&[1, b'a', 0])),
            "container field"
        );
        // A boolean that is neither 0 nor 1 reads as a malformed reply.
        let mut two = good.clone();
        let at = two.len() - 4;
        two[at] = 2;
        assert!(matches!(
            parse(&two).expect("header parses").answer_to(3),
            Some(Err(BusError::Malformed(_)))
        ));
        // Non-zero padding.
        let mut padded = good.clone();
        let at = padded.len() - 5;
        padded[at] = 7;
        assert!(
            parse(&padded)
                .expect("header")
                .answer_to(3)
                .expect("reply")
                .is_err()
        );

        // A string whose length runs past the end of the header fields.
        let error = message(ERROR, 9, &[(4, b's', s("e")), (5, b'u', u(7))], &[]);
        let mut long = error.clone();
        long[20..24].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(parse(&long).is_err());
        // A string without its NUL.
        let mut unterminated = error.clone();
        unterminated[25] = b'x';
        assert!(parse(&unterminated).is_err());

        // Variants inside variants, and a variant of a container type.
        let nested = reply(3, "v", &[1, b'v', 0, 1, b'b', 0, 0, 0, 1, 0, 0, 0]);
        let body = parse(&nested)
            .expect("header parses")
            .answer_to(3)
            .expect("reply");
        assert!(matches!(body, Err(BusError::Malformed(_))));
        let array = reply(3, "v", &[2, b'a', b'y', 0, 0, 0, 0, 0]);
        assert!(
            parse(&array)
                .expect("header")
                .answer_to(3)
                .expect("reply")
                .is_err()
        );
        assert!(
            parse(&reply(3, "uu", &[1, 0, 0, 0, 2, 0, 0, 0]))
                .expect("h")
                .answer_to(3)
                .expect("r")
                .is_err()
        );
        // A body with no signature.
        assert!(parse(&reply(3, "", &[0; 8])).is_err());

        // More header fields than any message needs (unknown ones are otherwise passed over).
        let one = parse(&message(ERROR, 9, &[(200, b'y', vec![1])], &[])).expect("parses");
        assert_eq!(one.reply_serial, None);
        let many: Vec<_> = (0..MAX_FIELDS + 1).map(|_| (200, b'y', vec![1])).collect();
        assert!(parse(&message(ERROR, 9, &many, &[])).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
            if let Some(prefix) = bytes.get(..16) {
                let _ = message_len(prefix.try_into().expect("16"));
            }
        }

        #[test]
        fn corrupted_replies_never_panic(
            flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8),
        ) {
            let mut bytes = name_acquired();
            bytes.extend(reply(3, "v", &[1, b'b', 0, 0, 1, 0, 0, 0]));
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            if let Ok(message) = parse(&bytes) {
                let _ = message.answer_to(3);
            }
            let _ = parse(&bytes[..bytes.len() / 2]);
        }
    }
}
