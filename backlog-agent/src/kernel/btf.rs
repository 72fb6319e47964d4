//! A small reader for the kernel's BTF type information.
//!
//! Why this exists: rustc emits no CO-RE relocations for eBPF, so a struct
//! offset compiled into our eBPF program is only right for the kernel it was
//! taken from. The agent instead reads the running kernel's layouts from
//! `/sys/kernel/btf/vmlinux` and hands the offsets to the program as globals.
//! We need only three questions answered (where is a member, what is an enum
//! value, does a function exist), so we parse BTF ourselves rather than pull
//! in btf-rs (LGPL) or aya-obj.
//!
//! The format is described in the kernel's `Documentation/bpf/btf.rst`. Only
//! base BTF is handled (vmlinux); split BTF (modules) would need the base's
//! type ids and strings, which nothing here needs yet.
//!
//! The blob comes from the kernel, but it is still treated as untrusted input:
//! every read is bounds-checked and every walk is depth-limited, so a
//! truncated or garbled blob gives an error value, never a panic.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a member lives inside the struct named by the first path component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Byte offset from the start of the outermost struct.
    pub offset: u32,
    /// Byte size of the member's type (after typedefs and qualifiers).
    pub size: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    // The cause is kept as `source` (not repeated in the message) so that
    // anyhow's "{:#}" chain prints it once.
    #[error("BTF: cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("BTF: malformed blob: {reason}")]
    Malformed { reason: String },
    #[error("BTF: no {kind} named \"{name}\"")]
    TypeNotFound { kind: &'static str, name: String },
    #[error("BTF: {container} has no member \"{member}\" (looking up {path})")]
    MemberNotFound {
        path: String,
        member: String,
        /// e.g. "struct sock" or "anonymous union".
        container: String,
    },
    #[error(
        "BTF: member \"{member}\" is a {kind}, not a struct or union, so it has no members \
         (looking up {path})"
    )]
    NotComposite {
        path: String,
        member: String,
        kind: &'static str,
    },
    #[error("BTF: enum {enum_name} has no value \"{variant}\"")]
    EnumValueNotFound { enum_name: String, variant: String },
    #[error(
        "BTF: member \"{member}\" is a bitfield or not byte-aligned (bit offset {bit_offset}, \
         {bits} bits), so it has no byte offset (looking up {path})"
    )]
    BitField {
        path: String,
        member: String,
        bit_offset: u64,
        bits: u32,
    },
    #[error("BTF: type id {id} at byte {offset} has unknown kind {kind}")]
    UnknownKind { id: u32, kind: u32, offset: usize },
}

fn malformed(reason: impl Into<String>) -> BtfError {
    BtfError::Malformed {
        reason: reason.into(),
    }
}

const MAGIC: u16 = 0xeb9f;
const VERSION: u8 = 1;
/// The header fields this reader knows; newer kernels may append more, which
/// `hdr_len` lets us skip.
const MIN_HEADER_LEN: usize = 24;
/// Every type record starts with name_off, info, size_or_type.
const RECORD_HEADER_LEN: usize = 12;
/// No real typedef chain or anonymous-member nesting comes close; the limit
/// only stops a garbled blob whose types refer to themselves.
const MAX_DEPTH: u32 = 64;
/// BTF for a 64-bit kernel: every pointer is 8 bytes.
const POINTER_SIZE: u32 = 8;

// Kind numbers from include/uapi/linux/btf.h.
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_INT => "INT",
        KIND_PTR => "PTR",
        KIND_ARRAY => "ARRAY",
        KIND_STRUCT => "STRUCT",
        KIND_UNION => "UNION",
        KIND_ENUM => "ENUM",
        KIND_FWD => "FWD",
        KIND_TYPEDEF => "TYPEDEF",
        KIND_VOLATILE => "VOLATILE",
        KIND_CONST => "CONST",
        KIND_RESTRICT => "RESTRICT",
        KIND_FUNC => "FUNC",
        KIND_FUNC_PROTO => "FUNC_PROTO",
        KIND_VAR => "VAR",
        KIND_DATASEC => "DATASEC",
        KIND_FLOAT => "FLOAT",
        KIND_DECL_TAG => "DECL_TAG",
        KIND_TYPE_TAG => "TYPE_TAG",
        KIND_ENUM64 => "ENUM64",
        _ => "unknown kind",
    }
}

/// Bytes that follow the 12-byte record header, or None for an unknown kind.
fn trailer_len(kind: u32, vlen: u32) -> Option<usize> {
    let vlen = vlen as usize;
    Some(match kind {
        KIND_INT => 4,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION => 12 * vlen,
        KIND_ENUM => 8 * vlen,
        KIND_FUNC_PROTO => 8 * vlen,
        KIND_VAR => 4,
        KIND_DATASEC => 12 * vlen,
        KIND_DECL_TAG => 4,
        KIND_ENUM64 => 12 * vlen,
        _ => return None,
    })
}

/// Kinds that only qualify or rename another type; a member's layout is that
/// of the type underneath.
fn is_modifier(kind: u32) -> bool {
    matches!(
        kind,
        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
    )
}

fn is_composite(kind: u32) -> bool {
    kind == KIND_STRUCT || kind == KIND_UNION
}

/// FNV-1a: a fast, fixed hash for the name index (no DoS concern here: the
/// blob is the kernel's own, and collisions are resolved by comparing names).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn read_u16(data: &[u8], pos: usize) -> Option<u16> {
    let bytes = data.get(pos..pos.checked_add(2)?)?;
    Some(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn read_u32(data: &[u8], pos: usize) -> Option<u32> {
    let bytes = data.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// A type record's fixed part, decoded.
#[derive(Debug, Clone, Copy)]
struct Type {
    id: u32,
    /// Absolute byte offset of the record in the blob.
    pos: usize,
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// Byte size for INT/ENUM/STRUCT/UNION/FLOAT/ENUM64/DATASEC, a type id
    /// for the others.
    size_or_type: u32,
}

/// One STRUCT/UNION member as stored.
#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u64,
    /// Non-zero only for a bitfield in a kind_flag struct.
    bitfield_size: u32,
}

/// A member found by name, possibly inside anonymous members.
#[derive(Debug, Clone, Copy)]
struct Found {
    /// Bits from the start of the struct that was searched.
    bit_offset: u64,
    bitfield_size: u32,
    type_id: u32,
}

/// Parsed BTF: the raw blob plus an index of where each type record starts.
pub struct Btf {
    data: Vec<u8>,
    strings_start: usize,
    strings_end: usize,
    /// `record_pos[id - 1]` is the absolute byte offset of type `id`'s record.
    record_pos: Vec<usize>,
    /// (hash of name, id) of every named STRUCT, UNION, TYPEDEF, ENUM, ENUM64
    /// and FUNC, sorted: the only kinds we look up by name. FWD is left out on
    /// purpose so that a forward declaration never shadows the definition.
    /// Sorted hashes rather than a HashMap<String, _> avoid ~80k small
    /// allocations, which were most of the parse time on vmlinux.
    by_name: Vec<(u64, u32)>,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("bytes", &self.data.len())
            .field("types", &self.record_pos.len())
            .finish()
    }
}

impl Btf {
    /// Reads and parses a BTF blob, typically `/sys/kernel/btf/vmlinux`.
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Btf::parse(data)
    }

    /// Parses a raw BTF blob, checking the header, the section bounds and
    /// that every type record is of a known kind and fits in the type section.
    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        if data.len() < MIN_HEADER_LEN {
            return Err(malformed(format!(
                "blob is {} bytes, shorter than the {MIN_HEADER_LEN}-byte header",
                data.len()
            )));
        }
        let magic = read_u16(&data, 0).unwrap_or(0);
        if magic != MAGIC {
            if magic.swap_bytes() == MAGIC {
                return Err(malformed("big-endian BTF is not supported"));
            }
            return Err(malformed(format!(
                "bad magic 0x{magic:04x} at byte 0 (expected 0x{MAGIC:04x})"
            )));
        }
        if data[2] != VERSION {
            return Err(malformed(format!(
                "unsupported version {} at byte 2 (expected {VERSION})",
                data[2]
            )));
        }
        let header_field = |pos: usize| read_u32(&data, pos).unwrap_or(0) as usize;
        let hdr_len = header_field(4);
        let (type_off, type_len) = (header_field(8), header_field(12));
        let (str_off, str_len) = (header_field(16), header_field(20));
        if hdr_len < MIN_HEADER_LEN || hdr_len > data.len() {
            return Err(malformed(format!(
                "header length {hdr_len} (at byte 4) is outside {MIN_HEADER_LEN}..={}",
                data.len()
            )));
        }
        let section = |name: &str, off: usize, len: usize| {
            let start = hdr_len.checked_add(off);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= data.len() => Ok((start, end)),
                _ => Err(malformed(format!(
                    "{name} section (offset {off}, length {len} after the {hdr_len}-byte \
                     header) runs past the end of the {}-byte blob",
                    data.len()
                ))),
            }
        };
        let (types_start, types_end) = section("type", type_off, type_len)?;
        let (strings_start, strings_end) = section("string", str_off, str_len)?;
        if type_off % 4 != 0 {
            return Err(malformed(format!(
                "type section offset {type_off} is not 4-byte aligned"
            )));
        }
        if types_start < strings_end && strings_start < types_end && type_len > 0 {
            return Err(malformed(format!(
                "type section (bytes {types_start}..{types_end}) overlaps string section \
                 (bytes {strings_start}..{strings_end})"
            )));
        }
        // Offset 0 must be the empty name, and a NUL at the very end means
        // every in-bounds name offset finds its terminator.
        if str_len == 0 || data[strings_start] != 0 || data[strings_end - 1] != 0 {
            return Err(malformed(format!(
                "string section (bytes {strings_start}..{strings_end}) must start and end \
                 with a NUL byte"
            )));
        }

        let mut btf = Btf {
            data,
            strings_start,
            strings_end,
            record_pos: Vec::new(),
            by_name: Vec::new(),
        };
        btf.index_types(types_start, types_end)?;
        Ok(btf)
    }

    /// Walks the type section once, recording where each record starts and
    /// the ids of the named types we may look up.
    fn index_types(&mut self, start: usize, end: usize) -> Result<(), BtfError> {
        let mut record_pos = Vec::with_capacity((end - start) / 16);
        let mut by_name = Vec::new();
        let mut pos = start;
        while pos < end {
            let id = u32::try_from(record_pos.len() + 1)
                .map_err(|_| malformed("more than 2^32 types"))?;
            let ty = self.decode_record(id, pos, end)?;
            let trailer = trailer_len(ty.kind, ty.vlen).ok_or(BtfError::UnknownKind {
                id,
                kind: ty.kind,
                offset: pos,
            })?;
            let next = pos + RECORD_HEADER_LEN + trailer;
            if next > end {
                return Err(malformed(format!(
                    "type id {id} ({}) at byte {pos} needs {} bytes but the type section \
                     ends at byte {end}",
                    kind_name(ty.kind),
                    RECORD_HEADER_LEN + trailer
                )));
            }
            // Check every type name now, so later lookups can trust them.
            let name = self.name(ty.name_off)?;
            let searchable = matches!(
                ty.kind,
                KIND_STRUCT | KIND_UNION | KIND_TYPEDEF | KIND_ENUM | KIND_ENUM64 | KIND_FUNC
            );
            if searchable && !name.is_empty() {
                by_name.push((name_hash(name), id));
            }
            record_pos.push(pos);
            pos = next;
        }
        // Sorting the (hash, id) pairs keeps ids ascending within one name,
        // so "the first struct of that name" is the lowest id.
        by_name.sort_unstable();
        self.record_pos = record_pos;
        self.by_name = by_name;
        Ok(())
    }

    /// Decodes the fixed 12-byte part of the record at `pos`, which must end
    /// before `end`.
    fn decode_record(&self, id: u32, pos: usize, end: usize) -> Result<Type, BtfError> {
        let truncated = || {
            malformed(format!(
                "type id {id} at byte {pos} is cut off by the end of the type section \
                 (byte {end})"
            ))
        };
        if pos.checked_add(RECORD_HEADER_LEN).is_none_or(|e| e > end) {
            return Err(truncated());
        }
        let word = |off: usize| read_u32(&self.data, pos + off).ok_or_else(truncated);
        let name_off = word(0)?;
        let info = word(4)?;
        let size_or_type = word(8)?;
        Ok(Type {
            id,
            pos,
            name_off,
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type,
        })
    }

    fn ty(&self, id: u32) -> Result<Type, BtfError> {
        if id == 0 {
            return Err(malformed(
                "type id 0 (void) used where a sized type is needed",
            ));
        }
        let pos = *self.record_pos.get(id as usize - 1).ok_or_else(|| {
            malformed(format!(
                "type id {id} is referenced but only {} types exist",
                self.record_pos.len()
            ))
        })?;
        // The index was built from these same bytes, so this only re-reads
        // what was already bounds-checked.
        self.decode_record(id, pos, self.data.len())
    }

    fn name(&self, name_off: u32) -> Result<&str, BtfError> {
        let start = self
            .strings_start
            .checked_add(name_off as usize)
            .filter(|&s| s < self.strings_end)
            .ok_or_else(|| {
                malformed(format!(
                    "name offset {name_off} is outside the {}-byte string section",
                    self.strings_end - self.strings_start
                ))
            })?;
        let tail = self.data.get(start..self.strings_end).unwrap_or(&[]);
        let len = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..len]).map_err(|_| {
            malformed(format!(
                "name at string offset {name_off} (byte {start}) is not UTF-8"
            ))
        })
    }

    /// The u32 at `index * stride + within` in the record's trailer.
    fn trailer_u32(
        &self,
        ty: &Type,
        stride: usize,
        index: u32,
        within: usize,
    ) -> Result<u32, BtfError> {
        (index as usize)
            .checked_mul(stride)
            .and_then(|o| o.checked_add(ty.pos + RECORD_HEADER_LEN + within))
            .and_then(|p| read_u32(&self.data, p))
            .ok_or_else(|| {
                malformed(format!(
                    "type id {} at byte {} is cut off in its entry {index}",
                    ty.id, ty.pos
                ))
            })
    }

    fn member(&self, ty: &Type, index: u32) -> Result<Member, BtfError> {
        let name_off = self.trailer_u32(ty, 12, index, 0)?;
        let type_id = self.trailer_u32(ty, 12, index, 4)?;
        let offset = self.trailer_u32(ty, 12, index, 8)?;
        // With kind_flag set, the offset word packs the bitfield size into
        // its top byte; without it, the whole word is the bit offset.
        let (bit_offset, bitfield_size) = if ty.kind_flag {
            (offset & 0x00ff_ffff, offset >> 24)
        } else {
            (offset, 0)
        };
        Ok(Member {
            name_off,
            type_id,
            bit_offset: u64::from(bit_offset),
            bitfield_size,
        })
    }

    /// Follows typedefs and qualifiers down to the type that gives the layout.
    fn resolve(&self, id: u32) -> Result<Type, BtfError> {
        let mut ty = self.ty(id)?;
        for _ in 0..MAX_DEPTH {
            if !is_modifier(ty.kind) {
                return Ok(ty);
            }
            ty = self.ty(ty.size_or_type)?;
        }
        Err(malformed(format!(
            "type id {id} starts a typedef/qualifier chain longer than {MAX_DEPTH} (a loop?)"
        )))
    }

    /// Byte size of an already resolved type.
    fn byte_size(&self, ty: &Type, depth: u32) -> Result<u32, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "type id {} nests arrays deeper than {MAX_DEPTH} (a loop?)",
                ty.id
            )));
        }
        match ty.kind {
            KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT | KIND_STRUCT | KIND_UNION => {
                Ok(ty.size_or_type)
            }
            KIND_PTR => Ok(POINTER_SIZE),
            KIND_ARRAY => {
                let elem_id = self.trailer_u32(ty, 12, 0, 0)?;
                let nelems = self.trailer_u32(ty, 12, 0, 8)?;
                let elem = self.resolve(elem_id)?;
                let elem_size = self.byte_size(&elem, depth + 1)?;
                nelems.checked_mul(elem_size).ok_or_else(|| {
                    malformed(format!(
                        "array type id {} of {nelems} x {elem_size} bytes overflows u32",
                        ty.id
                    ))
                })
            }
            other => Err(malformed(format!(
                "type id {} is a {}, which has no size",
                ty.id,
                kind_name(other)
            ))),
        }
    }

    /// Searches `container` for a member called `name`, descending into
    /// unnamed struct/union members (the kernel wraps many fields in anonymous
    /// unions and struct_group()s), first match in declaration order.
    fn find_member(
        &self,
        container: &Type,
        name: &str,
        depth: u32,
    ) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "type id {} nests anonymous members deeper than {MAX_DEPTH} (a loop?)",
                container.id
            )));
        }
        for index in 0..container.vlen {
            let member = self.member(container, index)?;
            let member_name = self.name(member.name_off)?;
            if member_name == name {
                return Ok(Some(Found {
                    bit_offset: member.bit_offset,
                    bitfield_size: member.bitfield_size,
                    type_id: member.type_id,
                }));
            }
            if !member_name.is_empty() {
                continue;
            }
            let inner = self.resolve(member.type_id)?;
            if !is_composite(inner.kind) {
                continue;
            }
            if let Some(found) = self.find_member(&inner, name, depth + 1)? {
                if member.bitfield_size != 0 {
                    return Err(malformed(format!(
                        "anonymous member {index} of type id {} is a bitfield",
                        container.id
                    )));
                }
                return Ok(Some(Found {
                    bit_offset: member.bit_offset + found.bit_offset,
                    ..found
                }));
            }
        }
        Ok(None)
    }

    /// Ids of the searchable types called `name`, lowest first.
    fn ids_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = u32> + 'a {
        let hash = name_hash(name);
        let first = self.by_name.partition_point(|&(h, _)| h < hash);
        self.by_name[first..]
            .iter()
            .take_while(move |&&(h, _)| h == hash)
            .map(|&(_, id)| id)
            // Different names can share a hash.
            .filter(move |&id| {
                self.ty(id)
                    .and_then(|ty| self.name(ty.name_off))
                    .is_ok_and(|n| n == name)
            })
    }

    fn describe(&self, ty: &Type) -> String {
        let kind = if ty.kind == KIND_UNION {
            "union"
        } else {
            "struct"
        };
        match self.name(ty.name_off) {
            Ok(name) if !name.is_empty() => format!("{kind} {name}"),
            _ => format!("anonymous {kind}"),
        }
    }

    /// The struct or union called `name`: a full definition with members if
    /// there is one (the first such), else a typedef of a struct or union,
    /// else an empty struct. Forward declarations never count.
    fn composite_by_name(&self, name: &str) -> Result<Type, BtfError> {
        let not_found = || BtfError::TypeNotFound {
            kind: "struct, union or typedef",
            name: name.to_owned(),
        };
        let mut typedef = None;
        let mut empty = None;
        for id in self.ids_named(name) {
            let ty = self.ty(id)?;
            if is_composite(ty.kind) {
                if ty.vlen > 0 {
                    return Ok(ty);
                }
                empty.get_or_insert(ty);
            } else if ty.kind == KIND_TYPEDEF && typedef.is_none() {
                let target = self.resolve(id)?;
                if is_composite(target.kind) {
                    typedef = Some(target);
                }
            }
        }
        typedef.or(empty).ok_or_else(not_found)
    }

    /// Byte offset and size of a member, by a path such as
    /// `"sock.__sk_common.skc_num"`: the first component names a struct or
    /// union (or a typedef of one); each later component is a member of the
    /// previous one, found through anonymous members. A path of only a type
    /// name gives offset 0 and the type's size.
    pub fn field(&self, path: &str) -> Result<Field, BtfError> {
        let mut components = path.split('.');
        let root = components.next().unwrap_or_default();
        let mut current = self.composite_by_name(root)?;
        let mut bit_offset: u64 = 0;
        let mut previous_member: Option<&str> = None;
        for member_name in components {
            // An empty component would otherwise match an unnamed member.
            if member_name.is_empty() {
                return Err(BtfError::MemberNotFound {
                    path: path.to_owned(),
                    member: String::new(),
                    container: self.describe(&current),
                });
            }
            if !is_composite(current.kind) {
                return Err(BtfError::NotComposite {
                    path: path.to_owned(),
                    member: previous_member.unwrap_or(root).to_owned(),
                    kind: kind_name(current.kind),
                });
            }
            let found = self.find_member(&current, member_name, 0)?.ok_or_else(|| {
                BtfError::MemberNotFound {
                    path: path.to_owned(),
                    member: member_name.to_owned(),
                    container: self.describe(&current),
                }
            })?;
            let target = self.resolve(found.type_id)?;
            // Pre-kind_flag BTF marks bitfields on the INT type instead:
            // fewer bits than the type's size, or a bit offset of its own.
            let int_bits = if target.kind == KIND_INT {
                let encoding = self.trailer_u32(&target, 4, 0, 0)?;
                let (int_offset, bits) = ((encoding >> 16) & 0xff, encoding & 0xff);
                let whole = u64::from(target.size_or_type) * 8 == u64::from(bits);
                (int_offset != 0 || !whole).then_some(bits)
            } else {
                None
            };
            if found.bitfield_size != 0 || found.bit_offset % 8 != 0 || int_bits.is_some() {
                return Err(BtfError::BitField {
                    path: path.to_owned(),
                    member: member_name.to_owned(),
                    bit_offset: bit_offset + found.bit_offset,
                    bits: int_bits.unwrap_or(found.bitfield_size),
                });
            }
            bit_offset += found.bit_offset;
            current = target;
            previous_member = Some(member_name);
        }
        let offset = u32::try_from(bit_offset / 8).map_err(|_| {
            malformed(format!(
                "offset of {path} ({bit_offset} bits) overflows u32"
            ))
        })?;
        let size = self.byte_size(&current, 0)?;
        Ok(Field { offset, size })
    }

    /// The value of `variant` in the ENUM or ENUM64 called `enum_name` (or a
    /// typedef of one). Signed 32-bit values are sign-extended, so -1 comes
    /// back as `u64::MAX`.
    pub fn enum_value(&self, enum_name: &str, variant: &str) -> Result<u64, BtfError> {
        let mut any_enum = false;
        for id in self.ids_named(enum_name) {
            let ty = self.resolve(id)?;
            if ty.kind != KIND_ENUM && ty.kind != KIND_ENUM64 {
                continue;
            }
            any_enum = true;
            if let Some(value) = self.variant_of(&ty, variant)? {
                return Ok(value);
            }
        }
        if !any_enum {
            return Err(BtfError::TypeNotFound {
                kind: "enum",
                name: enum_name.to_owned(),
            });
        }
        Err(BtfError::EnumValueNotFound {
            enum_name: enum_name.to_owned(),
            variant: variant.to_owned(),
        })
    }

    /// The value of enumerator `variant` in whichever enum declares it:
    /// for the kernel's anonymous enums, such as the LINUX_MIB_* counter
    /// indexes of include/uapi/linux/snmp.h. A linear scan of all types,
    /// so only for a handful of start-up lookups.
    pub fn enumerator(&self, variant: &str) -> Result<u64, BtfError> {
        for id in 1..=self.record_pos.len() as u32 {
            let ty = self.ty(id)?;
            if ty.kind != KIND_ENUM && ty.kind != KIND_ENUM64 {
                continue;
            }
            if let Some(value) = self.variant_of(&ty, variant)? {
                return Ok(value);
            }
        }
        Err(BtfError::EnumValueNotFound {
            enum_name: "(any)".to_owned(),
            variant: variant.to_owned(),
        })
    }

    /// Looks `variant` up among the enumerators of `ty` (ENUM or ENUM64).
    fn variant_of(&self, ty: &Type, variant: &str) -> Result<Option<u64>, BtfError> {
        let stride = if ty.kind == KIND_ENUM64 { 12 } else { 8 };
        for index in 0..ty.vlen {
            let name_off = self.trailer_u32(ty, stride, index, 0)?;
            if self.name(name_off)? != variant {
                continue;
            }
            let low = self.trailer_u32(ty, stride, index, 4)?;
            return Ok(Some(if ty.kind == KIND_ENUM64 {
                let high = self.trailer_u32(ty, stride, index, 8)?;
                (u64::from(high) << 32) | u64::from(low)
            } else if ty.kind_flag {
                // kind_flag on an ENUM means its values are unsigned.
                u64::from(low)
            } else {
                i64::from(low as i32) as u64
            }));
        }
        Ok(None)
    }

    /// Whether a FUNC called `name` exists: the kernel has BTF for it, so
    /// fentry can target it (and it was not inlined away entirely).
    pub fn has_function(&self, name: &str) -> bool {
        self.ids_named(name)
            .any(|id| self.ty(id).is_ok_and(|ty| ty.kind == KIND_FUNC))
    }

    /// Number of parameters of the FUNC `name`. fexit programs find the
    /// return value after the arguments, and kernels add parameters
    /// (tcp_v4_syn_recv_sock gained a seventh in 6.12).
    pub fn function_param_count(&self, name: &str) -> Result<u32, BtfError> {
        for id in self.ids_named(name) {
            let func = self.ty(id)?;
            if func.kind != KIND_FUNC {
                continue;
            }
            let proto = self.ty(func.size_or_type)?;
            if proto.kind != KIND_FUNC_PROTO {
                return Err(malformed(format!(
                    "FUNC {name} (id {id}) does not point to a FUNC_PROTO"
                )));
            }
            return Ok(proto.vlen);
        }
        Err(BtfError::TypeNotFound {
            kind: "function",
            name: name.to_owned(),
        })
    }

    /// Number of arguments a tp_btf program on the tracepoint `name` gets:
    /// the parameters of the kernel's `btf_trace_<name>` typedef (a
    /// pointer to a FUNC_PROTO), less its leading `void *__data`. Kernels
    /// add arguments to tracepoints (skb:kfree_skb gained `rx_sk` in
    /// 6.11), and a tp_btf program reads them by position.
    pub fn tracepoint_arg_count(&self, name: &str) -> Result<u32, BtfError> {
        let typedef = format!("btf_trace_{name}");
        for id in self.ids_named(&typedef) {
            let ty = self.ty(id)?;
            if ty.kind != KIND_TYPEDEF {
                continue;
            }
            let ptr = self.resolve(ty.size_or_type)?;
            let proto = if ptr.kind == KIND_PTR {
                self.resolve(ptr.size_or_type)?
            } else {
                ptr
            };
            if proto.kind != KIND_FUNC_PROTO || proto.vlen == 0 {
                return Err(malformed(format!(
                    "TYPEDEF {typedef} (id {id}) is not a pointer to a FUNC_PROTO with __data"
                )));
            }
            return Ok(proto.vlen - 1);
        }
        Err(BtfError::TypeNotFound {
            kind: "tracepoint typedef",
            name: typedef,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Instant;

    /// Assembles synthetic BTF blobs, one type record at a time.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn u32(&mut self, v: u32) {
            self.types.extend_from_slice(&v.to_le_bytes());
        }

        fn head(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, sot: u32) -> u32 {
            let name_off = self.str(name);
            self.u32(name_off);
            self.u32(u32::from(kind_flag) << 31 | kind << 24 | vlen);
            self.u32(sot);
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.int_bits(name, size, 0, size * 8)
        }

        fn int_bits(&mut self, name: &str, size: u32, offset: u32, bits: u32) -> u32 {
            let id = self.head(name, KIND_INT, 0, false, size);
            self.u32(offset << 16 | bits);
            id
        }

        fn ptr(&mut self, target: u32) -> u32 {
            self.head("", KIND_PTR, 0, false, target)
        }

        fn array(&mut self, elem: u32, index: u32, nelems: u32) -> u32 {
            let id = self.head("", KIND_ARRAY, 0, false, 0);
            self.u32(elem);
            self.u32(index);
            self.u32(nelems);
            id
        }

        /// Members are (name, type id, bit offset).
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let id = self.head(name, kind, members.len() as u32, false, size);
            for &(m, t, off) in members {
                let n = self.str(m);
                self.u32(n);
                self.u32(t);
                self.u32(off);
            }
            id
        }

        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.composite(KIND_STRUCT, name, size, members)
        }

        fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.composite(KIND_UNION, name, size, members)
        }

        /// A kind_flag struct; members are (name, type id, bit offset, bitfield bits).
        fn strukt_bitfields(
            &mut self,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let id = self.head(name, KIND_STRUCT, members.len() as u32, true, size);
            for &(m, t, off, bits) in members {
                let n = self.str(m);
                self.u32(n);
                self.u32(t);
                self.u32(bits << 24 | off);
            }
            id
        }

        fn enum32(&mut self, name: &str, unsigned: bool, values: &[(&str, i32)]) -> u32 {
            let id = self.head(name, KIND_ENUM, values.len() as u32, unsigned, 4);
            for &(v, val) in values {
                let n = self.str(v);
                self.u32(n);
                self.u32(val as u32);
            }
            id
        }

        fn enum64(&mut self, name: &str, values: &[(&str, u64)]) -> u32 {
            let id = self.head(name, KIND_ENUM64, values.len() as u32, true, 8);
            for &(v, val) in values {
                let n = self.str(v);
                self.u32(n);
                self.u32(val as u32);
                self.u32((val >> 32) as u32);
            }
            id
        }

        fn fwd(&mut self, name: &str) -> u32 {
            self.head(name, KIND_FWD, 0, false, 0)
        }

        /// TYPEDEF, VOLATILE, CONST, RESTRICT or TYPE_TAG.
        fn modifier(&mut self, kind: u32, name: &str, target: u32) -> u32 {
            self.head(name, kind, 0, false, target)
        }

        fn func_proto(&mut self, ret: u32, params: &[(&str, u32)]) -> u32 {
            let id = self.head("", KIND_FUNC_PROTO, params.len() as u32, false, ret);
            for &(p, t) in params {
                let n = self.str(p);
                self.u32(n);
                self.u32(t);
            }
            id
        }

        fn func(&mut self, name: &str, proto: u32) -> u32 {
            self.head(name, KIND_FUNC, 0, false, proto)
        }

        fn var(&mut self, name: &str, t: u32) -> u32 {
            let id = self.head(name, KIND_VAR, 0, false, t);
            self.u32(1);
            id
        }

        fn datasec(&mut self, name: &str, size: u32, vars: &[(u32, u32, u32)]) -> u32 {
            let id = self.head(name, KIND_DATASEC, vars.len() as u32, false, size);
            for &(t, off, sz) in vars {
                self.u32(t);
                self.u32(off);
                self.u32(sz);
            }
            id
        }

        fn float(&mut self, name: &str, size: u32) -> u32 {
            self.head(name, KIND_FLOAT, 0, false, size)
        }

        fn decl_tag(&mut self, name: &str, t: u32, component: i32) -> u32 {
            let id = self.head(name, KIND_DECL_TAG, 0, false, t);
            self.u32(component as u32);
            id
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.push(VERSION);
            out.push(0);
            for v in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A blob that uses every kind and mimics the kernel's shapes: fields in
    /// anonymous unions and struct_groups, typedef/const chains, bitfields,
    /// enums, and a FWD declared before the full struct.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let u8_t = b.int("unsigned char", 1);
        let u16_t = b.int("short unsigned int", 2);
        let u32_t = b.int("unsigned int", 4);
        let u64_t = b.int("long long unsigned int", 8);
        let be16 = b.modifier(KIND_TYPEDEF, "__be16", u16_t);
        let const_be16 = b.modifier(KIND_CONST, "", be16);
        let vol = b.modifier(KIND_VOLATILE, "", const_be16);
        let tagged = b.modifier(KIND_TYPE_TAG, "rcu", vol);
        let u32_typedef = b.modifier(KIND_TYPEDEF, "u32", u32_t);
        let sock_common_fwd = b.fwd("sock_common");
        let sock_common_fwd_ptr = b.ptr(sock_common_fwd);
        // union { struct { __be16 dport; u16 num; }; u32 portpair; }
        let ports = b.strukt("", 4, &[("skc_dport", tagged, 0), ("skc_num", u16_t, 16)]);
        let port_union = b.union("", 4, &[("", ports, 0), ("skc_portpair", u32_typedef, 0)]);
        let addrs = b.array(u32_t, u32_t, 4);
        let sock_common = b.strukt(
            "sock_common",
            32,
            &[
                ("skc_daddr", u32_t, 0),
                ("", port_union, 32),
                ("skc_v6_daddr", addrs, 64),
                ("skc_next", sock_common_fwd_ptr, 192),
            ],
        );
        let flags = b.strukt_bitfields(
            "flags",
            4,
            &[
                ("a", u8_t, 0, 4),
                ("b", u8_t, 4, 4),
                ("c", u16_t, 16, 0),
                ("d", u8_t, 8, 0),
            ],
        );
        let old_bits = b.int_bits("unsigned int", 4, 0, 3);
        let old_style = b.strukt("old_style", 4, &[("x", old_bits, 0), ("y", u32_t, 0)]);
        let const_flags = b.modifier(KIND_CONST, "", flags);
        let qlen = b.strukt("", 8, &[("qlen", u32_t, 0), ("young", u32_t, 32)]);
        let group = b.union("", 8, &[("", qlen, 0), ("raw", u64_t, 0)]);
        let queue = b.strukt(
            "request_sock_queue",
            16,
            &[("lock", u64_t, 0), ("", group, 64)],
        );
        let queue_typedef = b.modifier(KIND_TYPEDEF, "request_sock_queue_t", queue);
        // sock is followed by a pointer to it and a zero-length array.
        let (sk_ptr, sk_zero) = (b.next_id + 1, b.next_id + 2);
        let sock = b.strukt(
            "sock",
            80,
            &[
                ("__sk_common", sock_common, 0),
                ("sk_flags", const_flags, 256),
                ("sk_old", old_style, 288),
                ("icsk_accept_queue", queue_typedef, 320),
                ("sk_ptr", sk_ptr, 448),
                ("sk_zero", sk_zero, 512),
            ],
        );
        assert_eq!(b.ptr(sock), sk_ptr);
        assert_eq!(b.array(u8_t, u32_t, 0), sk_zero);
        // A later, distinct struct of the same name must not win.
        b.strukt("sock", 4, &[("other", u32_t, 0)]);
        let anon_net = b.strukt("", 8, &[("net", sock, 0)]);
        b.modifier(KIND_TYPEDEF, "possible_net_t", anon_net);
        b.enum32(
            "skb_drop_reason",
            false,
            &[
                ("SKB_NOT_DROPPED_YET", 0),
                ("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW", 40),
                ("NEG", -2),
            ],
        );
        b.enum32("uflags", true, &[("HIGH", -1)]);
        b.enum64("big", &[("SMALL", 1), ("HUGE", 0x1234_5678_9abc_def0)]);
        let proto = b.func_proto(u32_t, &[("sk", sock), ("", 0)]);
        b.func("tcp_v4_syn_recv_sock", proto);
        // How the kernel declares a tracepoint's arguments for tp_btf.
        let tp = b.func_proto(0, &[("", sock), ("skb", sock), ("reason", u32_t)]);
        let tp_ptr = b.ptr(tp);
        b.modifier(KIND_TYPEDEF, "btf_trace_kfree_skb", tp_ptr);
        b.modifier(KIND_TYPEDEF, "btf_trace_not_a_proto", sock);
        let v = b.var("some_var", u32_t);
        b.datasec(".data..percpu", 4, &[(v, 0, 4)]);
        b.float("double", 8);
        b.decl_tag("tag", sock, -1);
        b.modifier(KIND_RESTRICT, "", sock);
        b.strukt("empty", 0, &[]);
        b.build()
    }

    fn sample_btf() -> Btf {
        match Btf::parse(sample()) {
            Ok(btf) => btf,
            Err(e) => panic!("sample blob does not parse: {e}"),
        }
    }

    fn field(btf: &Btf, path: &str) -> Field {
        btf.field(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn walks_every_kind() {
        let btf = sample_btf();
        assert_eq!(btf.record_pos.len(), 44);
        // Every id resolves to a record of a known kind.
        for id in 1..=btf.record_pos.len() as u32 {
            let ty = btf.ty(id).unwrap_or_else(|e| panic!("type {id}: {e}"));
            assert!(trailer_len(ty.kind, ty.vlen).is_some());
        }
        let kinds: std::collections::BTreeSet<u32> = (1..=btf.record_pos.len() as u32)
            .map(|id| btf.ty(id).map(|t| t.kind).unwrap_or(0))
            .collect();
        assert_eq!(kinds, (1..=19).collect());
    }

    #[test]
    fn finds_members_through_anonymous_members() {
        let btf = sample_btf();
        assert_eq!(
            field(&btf, "sock.__sk_common.skc_daddr"),
            Field { offset: 0, size: 4 }
        );
        assert_eq!(
            field(&btf, "sock.__sk_common.skc_dport"),
            Field { offset: 4, size: 2 }
        );
        assert_eq!(
            field(&btf, "sock.__sk_common.skc_num"),
            Field { offset: 6, size: 2 }
        );
        assert_eq!(
            field(&btf, "sock.__sk_common.skc_portpair"),
            Field { offset: 4, size: 4 }
        );
        assert_eq!(
            field(&btf, "sock.__sk_common.skc_v6_daddr"),
            Field {
                offset: 8,
                size: 16
            }
        );
        assert_eq!(
            field(&btf, "sock.__sk_common.skc_next"),
            Field {
                offset: 24,
                size: 8
            }
        );
        assert_eq!(
            field(&btf, "sock.icsk_accept_queue"),
            Field {
                offset: 40,
                size: 16
            }
        );
        assert_eq!(
            field(&btf, "sock.icsk_accept_queue.qlen"),
            Field {
                offset: 48,
                size: 4
            }
        );
        assert_eq!(
            field(&btf, "sock.icsk_accept_queue.young"),
            Field {
                offset: 52,
                size: 4
            }
        );
        assert_eq!(
            field(&btf, "request_sock_queue.qlen"),
            Field { offset: 8, size: 4 }
        );
        assert_eq!(
            field(&btf, "sock.sk_ptr"),
            Field {
                offset: 56,
                size: 8
            }
        );
        assert_eq!(
            field(&btf, "sock.sk_zero"),
            Field {
                offset: 64,
                size: 0
            }
        );
        // Through a const typedef'd struct, and a byte-aligned member of a
        // kind_flag struct.
        assert_eq!(
            field(&btf, "sock.sk_flags.c"),
            Field {
                offset: 34,
                size: 2
            }
        );
        assert_eq!(
            field(&btf, "sock.sk_flags.d"),
            Field {
                offset: 33,
                size: 1
            }
        );
        // A typedef of an anonymous struct as the root, like possible_net_t.
        assert_eq!(
            field(&btf, "possible_net_t.net"),
            Field {
                offset: 0,
                size: 80
            }
        );
        assert_eq!(
            field(&btf, "possible_net_t.net.icsk_accept_queue.qlen").offset,
            48
        );
        assert_eq!(
            field(&btf, "sock"),
            Field {
                offset: 0,
                size: 80
            }
        );
        assert_eq!(field(&btf, "request_sock_queue_t.qlen").offset, 8);
        assert_eq!(field(&btf, "empty"), Field { offset: 0, size: 0 });
    }

    #[test]
    fn missing_things_are_named() {
        let btf = sample_btf();
        let err = btf.field("sock.sk_ino").map(|_| ()).unwrap_err();
        assert!(matches!(err, BtfError::MemberNotFound { .. }));
        assert_eq!(
            err.to_string(),
            "BTF: struct sock has no member \"sk_ino\" (looking up sock.sk_ino)"
        );
        let err = btf.field("sock.__sk_common.nope").map(|_| ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BTF: struct sock_common has no member \"nope\" (looking up sock.__sk_common.nope)"
        );
        let err = btf.field("socket.file").map(|_| ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BTF: no struct, union or typedef named \"socket\""
        );
        let err = btf.field("sock.sk_ptr.x").map(|_| ()).unwrap_err();
        assert!(
            matches!(err, BtfError::NotComposite { kind: "PTR", .. }),
            "{err}"
        );
        let err = btf.field("sock.").map(|_| ()).unwrap_err();
        assert!(matches!(err, BtfError::MemberNotFound { .. }), "{err}");
        // Unnamed members are never matched by an empty name.
        let err = btf.field("").map(|_| ()).unwrap_err();
        assert!(matches!(err, BtfError::TypeNotFound { .. }), "{err}");
        // A name used only by a non-struct type.
        let err = btf.field("skb_drop_reason.x").map(|_| ()).unwrap_err();
        assert!(matches!(err, BtfError::TypeNotFound { .. }), "{err}");
    }

    #[test]
    fn bitfields_are_errors() {
        let btf = sample_btf();
        for path in ["sock.sk_flags.a", "sock.sk_flags.b", "sock.sk_old.x"] {
            let err = btf.field(path).map(|_| ()).unwrap_err();
            assert!(matches!(err, BtfError::BitField { .. }), "{path}: {err}");
        }
        // Its plain neighbour in the old encoding is fine.
        assert_eq!(
            field(&btf, "sock.sk_old.y"),
            Field {
                offset: 36,
                size: 4
            }
        );
    }

    #[test]
    fn forward_declarations_do_not_shadow_definitions() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.fwd("thing");
        b.strukt("thing", 0, &[]);
        b.strukt("thing", 8, &[("a", int, 0), ("b", int, 32)]);
        b.strukt("thing", 4, &[("c", int, 0)]);
        b.fwd("only_fwd");
        let btf = Btf::parse(b.build()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(field(&btf, "thing.b"), Field { offset: 4, size: 4 });
        assert!(btf.field("thing.c").is_err());
        assert!(matches!(
            btf.field("only_fwd.x"),
            Err(BtfError::TypeNotFound { .. })
        ));
    }

    #[test]
    fn enum_values() {
        let btf = sample_btf();
        let value = |e: &str, v: &str| btf.enum_value(e, v).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"),
            40
        );
        assert_eq!(value("skb_drop_reason", "SKB_NOT_DROPPED_YET"), 0);
        assert_eq!(value("skb_drop_reason", "NEG"), (-2i64) as u64);
        assert_eq!(value("uflags", "HIGH"), 0xffff_ffff);
        assert_eq!(value("big", "SMALL"), 1);
        assert_eq!(value("big", "HUGE"), 0x1234_5678_9abc_def0);
        let err = btf.enum_value("skb_drop_reason", "NOPE").unwrap_err();
        assert_eq!(
            err.to_string(),
            "BTF: enum skb_drop_reason has no value \"NOPE\""
        );
        let err = btf.enum_value("nope", "X").unwrap_err();
        assert!(matches!(err, BtfError::TypeNotFound { .. }), "{err}");
        let err = btf.enum_value("sock", "X").unwrap_err();
        assert!(matches!(err, BtfError::TypeNotFound { .. }), "{err}");
    }

    #[test]
    fn functions() {
        let btf = sample_btf();
        assert!(btf.has_function("tcp_v4_syn_recv_sock"));
        assert_eq!(btf.function_param_count("tcp_v4_syn_recv_sock").unwrap(), 2);
        assert_eq!(btf.enumerator("HUGE").unwrap(), 0x1234_5678_9abc_def0);
        assert_eq!(
            btf.enumerator("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
                .unwrap(),
            40
        );
        assert!(matches!(
            btf.enumerator("NO_SUCH_ENUMERATOR"),
            Err(BtfError::EnumValueNotFound { .. })
        ));
        assert!(matches!(
            btf.function_param_count("nope"),
            Err(BtfError::TypeNotFound { .. })
        ));
        assert!(!btf.has_function("tcp_v6_syn_recv_sock"));
        assert_eq!(btf.tracepoint_arg_count("kfree_skb").unwrap(), 2);
        assert!(matches!(
            btf.tracepoint_arg_count("sock"),
            Err(BtfError::TypeNotFound { .. })
        ));
        assert!(matches!(
            btf.tracepoint_arg_count("not_a_proto"),
            Err(BtfError::Malformed { .. })
        ));
        assert!(!btf.has_function("sock"));
        assert!(!btf.has_function("some_var"));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let blob = sample();
        for len in 0..blob.len() {
            assert!(
                Btf::parse(blob[..len].to_vec()).is_err(),
                "a blob cut to {len} of {} bytes parsed",
                blob.len()
            );
        }
    }

    #[test]
    fn records_cut_inside_the_type_section_are_errors() {
        // Shrink type_len (moving the strings with it) so the header is
        // consistent but the last record is cut.
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.strukt("s", 8, &[("a", int, 0), ("b", int, 32)]);
        // Cutting 36 bytes or more would leave just the complete INT record.
        for cut in 1..36 {
            let mut short = Builder::new();
            short.types = b.types[..b.types.len() - cut].to_vec();
            short.strings = b.strings.clone();
            let err = Btf::parse(short.build()).map(|_| ()).unwrap_err();
            assert!(
                matches!(err, BtfError::Malformed { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn garbled_blobs_never_panic() {
        let blob = sample();
        let paths = [
            "sock.__sk_common.skc_num",
            "sock.icsk_accept_queue.qlen",
            "sock.sk_flags.c",
            "possible_net_t.net.sk_zero",
            "sock.sk_old.y",
        ];
        // Every byte, several values: the result may be Ok or Err, but the
        // parser and every lookup must return.
        for pos in 0..blob.len() {
            for value in [0x00, 0x01, 0x13, 0x7f, 0x80, 0xff] {
                let mut bad = blob.clone();
                bad[pos] = value;
                if let Ok(btf) = Btf::parse(bad) {
                    for path in paths {
                        let _ = btf.field(path);
                    }
                    let _ =
                        btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW");
                    let _ = btf.enum_value("big", "HUGE");
                    let _ = btf.has_function("tcp_v4_syn_recv_sock");
                }
            }
        }
    }

    #[test]
    fn loops_are_errors_not_stack_overflows() {
        let mut b = Builder::new();
        // typedef loop: 1 -> 2 -> 1
        b.modifier(KIND_TYPEDEF, "a", 2);
        b.modifier(KIND_CONST, "", 1);
        // a struct whose anonymous member is itself
        b.strukt("selfish", 4, &[("", 3, 0)]);
        b.strukt("holder", 4, &[("loop", 1, 0)]);
        // an array of itself
        b.array(5, 0, 2);
        b.strukt("arr", 4, &[("x", 5, 0)]);
        let btf = Btf::parse(b.build()).unwrap_or_else(|e| panic!("{e}"));
        for path in ["selfish.x", "holder.loop", "holder.loop.x", "arr.x", "a.x"] {
            let err = btf.field(path).map(|_| ()).unwrap_err();
            assert!(
                matches!(
                    err,
                    BtfError::Malformed { .. } | BtfError::TypeNotFound { .. }
                ),
                "{path}: {err}"
            );
        }
    }

    #[test]
    fn bad_references_are_errors() {
        let mut b = Builder::new();
        b.strukt("s", 4, &[("dangling", 99, 0), ("void", 0, 0)]);
        let btf = Btf::parse(b.build()).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            btf.field("s.dangling"),
            Err(BtfError::Malformed { .. })
        ));
        assert!(matches!(
            btf.field("s.void"),
            Err(BtfError::Malformed { .. })
        ));

        // A type name offset past the string section.
        let mut b = Builder::new();
        b.int("int", 4);
        b.types[0..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            Btf::parse(b.build()),
            Err(BtfError::Malformed { .. })
        ));
    }

    #[test]
    fn bad_magic() {
        let mut blob = sample();
        // The magic stored big-endian.
        blob[0] = 0xeb;
        blob[1] = 0x9f;
        let err = Btf::parse(blob).map(|_| ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BTF: malformed blob: big-endian BTF is not supported"
        );
        let mut blob = sample();
        blob[0] = 0;
        let err = Btf::parse(blob).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
    }

    #[test]
    fn bad_section_bounds() {
        let set = |pos: usize, v: u32| {
            let mut blob = sample();
            blob[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
            Btf::parse(blob).map(|_| ()).unwrap_err()
        };
        // String section one byte longer than the blob.
        let str_len = u32::from_le_bytes([sample()[20], sample()[21], sample()[22], sample()[23]]);
        let err = set(20, str_len + 1);
        assert!(err.to_string().contains("string section"), "{err}");
        // Offsets near u32::MAX must not overflow.
        let err = set(16, u32::MAX);
        assert!(matches!(err, BtfError::Malformed { .. }), "{err}");
        let err = set(12, u32::MAX);
        assert!(matches!(err, BtfError::Malformed { .. }), "{err}");
        // hdr_len smaller than the header, or larger than the blob.
        assert!(matches!(set(4, 8), BtfError::Malformed { .. }));
        assert!(matches!(set(4, u32::MAX), BtfError::Malformed { .. }));
        // Overlapping sections.
        let err = set(16, 0);
        assert!(err.to_string().contains("overlaps"), "{err}");
        // Misaligned type section.
        let err = set(8, 2);
        assert!(matches!(err, BtfError::Malformed { .. }), "{err}");
    }

    #[test]
    fn unknown_kind() {
        let mut b = Builder::new();
        b.int("int", 4);
        b.head("mystery", 20, 0, false, 0);
        let err = Btf::parse(b.build()).map(|_| ()).unwrap_err();
        assert!(
            matches!(
                err,
                BtfError::UnknownKind {
                    id: 2,
                    kind: 20,
                    offset: 40
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "BTF: type id 2 at byte 40 has unknown kind 20"
        );
        let mut b = Builder::new();
        b.head("zero", 0, 0, false, 0);
        assert!(matches!(
            Btf::parse(b.build()),
            Err(BtfError::UnknownKind { kind: 0, .. })
        ));
    }

    #[test]
    fn from_file_reads_and_reports_the_path() {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("tempdir: {e}"),
        };
        let path = dir.path().join("btf");
        std::fs::write(&path, sample()).unwrap_or_else(|e| panic!("{e}"));
        let btf = Btf::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(field(&btf, "sock.__sk_common.skc_num").offset, 6);
        let missing = dir.path().join("missing");
        let err = Btf::from_file(&missing).map(|_| ()).unwrap_err();
        assert!(matches!(err, BtfError::Io { .. }));
        assert!(err.to_string().contains("missing"), "{err}");
    }

    /// The paths the agent needs, resolved against this machine's kernel.
    #[test]
    fn real_vmlinux() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            crate::testing::skip(
                "real_vmlinux",
                &format!("{} does not exist on this machine", path.display()),
            );
            return;
        }
        let start = Instant::now();
        let btf = Btf::from_file(path).unwrap_or_else(|e| panic!("{e}"));
        let parsed = start.elapsed();
        let paths = [
            "sock.__sk_common.skc_daddr",
            "sock.__sk_common.skc_rcv_saddr",
            "sock.__sk_common.skc_dport",
            "sock.__sk_common.skc_num",
            "sock.__sk_common.skc_family",
            "sock.__sk_common.skc_net",
            "sock.__sk_common.skc_v6_daddr",
            "sock.__sk_common.skc_v6_rcv_saddr",
            "sock.sk_socket",
            "sock.sk_ack_backlog",
            "sock.sk_max_ack_backlog",
            "sock.sk_cgrp_data",
            "sock_cgroup_data.cgroup",
            "cgroup.kn",
            "kernfs_node.id",
            "sk_buff.head",
            "sk_buff.network_header",
            "sk_buff.transport_header",
            "inet_connection_sock.icsk_accept_queue",
            "inet_connection_sock.icsk_accept_queue.qlen",
            "request_sock_queue.qlen",
            "net.ns.inum",
            "possible_net_t.net",
            "socket_alloc.vfs_inode",
            "inode.i_ino",
        ];
        let mut fields = HashMap::new();
        for p in paths {
            let f = field(&btf, p);
            println!("{p:48} offset {:5} size {:3}", f.offset, f.size);
            fields.insert(p, f);
        }
        let reason = btf
            .enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
            .unwrap_or_else(|e| panic!("{e}"));
        println!("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW = {reason}");
        let has_syn_recv = btf.has_function("tcp_v4_syn_recv_sock");
        println!("has_function(tcp_v4_syn_recv_sock) = {has_syn_recv}");
        let total = start.elapsed();
        println!(
            "{} types; parse {parsed:?}, parse + lookups {total:?} (debug builds are slower)",
            btf.record_pos.len()
        );

        // Cuts of the real blob: inside the header, the type section and the
        // string section.
        let raw = std::fs::read(path).unwrap_or_else(|e| panic!("{e}"));
        for len in [10, raw.len() / 3, raw.len() - 1] {
            assert!(
                Btf::parse(raw[..len].to_vec()).is_err(),
                "cut to {len} parsed"
            );
        }

        let f = |p: &str| fields[p];
        assert_eq!(f("sock.__sk_common.skc_num").size, 2);
        assert_eq!(f("sock.__sk_common.skc_dport").size, 2);
        assert_eq!(f("sock.__sk_common.skc_family").size, 2);
        assert_eq!(f("sock.__sk_common.skc_daddr").size, 4);
        assert_eq!(f("sock.__sk_common.skc_rcv_saddr").size, 4);
        assert_eq!(f("sock.__sk_common.skc_v6_rcv_saddr").size, 16);
        assert_eq!(f("sock.sk_ack_backlog").size, 4);
        assert_eq!(f("sock.sk_max_ack_backlog").size, 4);
        assert_eq!(f("sock.sk_socket").size, 8);
        assert_eq!(f("sk_buff.head").size, 8);
        assert_eq!(f("sk_buff.network_header").size, 2);
        assert_eq!(f("sk_buff.transport_header").size, 2);
        assert_eq!(f("request_sock_queue.qlen").size, 4);
        assert_eq!(f("net.ns.inum").size, 4);
        assert_eq!(f("inode.i_ino").size, 8);
        assert_eq!(f("kernfs_node.id").size, 8);
        assert_eq!(f("possible_net_t.net").size, 8);
        assert!(f("sock.__sk_common.skc_num").offset > f("sock.__sk_common.skc_dport").offset);
        assert!(
            f("sock.__sk_common.skc_rcv_saddr").offset > f("sock.__sk_common.skc_daddr").offset
        );
        assert!(f("sock.sk_max_ack_backlog").offset > f("sock.sk_ack_backlog").offset);

        assert_eq!(
            f("inet_connection_sock.icsk_accept_queue.qlen").offset,
            f("inet_connection_sock.icsk_accept_queue").offset
                + f("request_sock_queue.qlen").offset
        );
        // struct sock starts with sock_common, which is inside every socket.
        assert!(f("sock.__sk_common.skc_v6_rcv_saddr").offset < f("sock.sk_socket").offset);
        assert!(f("socket_alloc.vfs_inode").offset > 0);
        assert_ne!(reason, 0);
        assert!(has_syn_recv);
        assert!(btf.has_function("tcp_conn_request"));
        assert!(!btf.has_function("tcp_listendrop"));
        assert!(!btf.has_function("sock"));
    }
}
