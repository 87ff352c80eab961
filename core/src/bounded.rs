//! Bounded reading of untrusted YAML: a document may not expand, through
//! anchors and aliases, into more values or string bytes than a budget.
//!
//! YAML lets a 27 KB document name a 3,000-entry list once and repeat it
//! through 3,000 aliases: 9 million strings, 16 s and 400 MB for a policy
//! (issue 17). serde_yaml_ng limits alias *jumps*, not what they expand
//! to. [`from_yaml`] wraps its deserializer in one that charges every
//! value, and every string's bytes, to a budget as serde visits them,
//! aliases included, and fails with a clear error the moment the budget is
//! spent: the work and memory of a parse are bounded by the budget, whatever
//! the document. It is generic over the target type, so a field added to a
//! policy type is covered without anything to remember.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, Visitor};

/// How much a document may make the parser produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size of the document's text.
    pub max_bytes: usize,
    /// Values visited (scalars, sequences, maps, each counted once per
    /// expansion of an alias that contains it).
    pub max_values: u64,
    /// Bytes of strings visited, aliases expanded.
    pub max_string_bytes: u64,
}

impl Limits {
    /// For configuration written by people (policy, HA config): far above
    /// any real one (a policy with 100 components of 100 namespaces each is
    /// about 12,000 values), far below what hurts (a parse under this
    /// budget takes milliseconds and a few MB).
    pub const CONFIG: Limits = Limits {
        max_bytes: 256 * 1024,
        max_values: 200_000,
        max_string_bytes: 4 * 1024 * 1024,
    };
}

/// Why a document was refused before or while it was read.
#[derive(Debug, thiserror::Error)]
pub enum BoundedError {
    /// The text itself is too large.
    #[error(
        "the document is {bytes} bytes, more than the {max} allowed; a configuration this \
         large is a mistake (or an attack): split it or remove what is not needed"
    )]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not UTF-8 text.
    #[error("the document is not UTF-8 text: {0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    /// Not valid YAML for the target type, or over the budget while read
    /// (the message says which, with the location when known).
    #[error("{0}")]
    Yaml(#[from] serde_yaml_ng::Error),
}

/// Parses `text` as a `T`, within `limits`.
pub fn from_yaml<T: de::DeserializeOwned>(text: &str, limits: Limits) -> Result<T, BoundedError> {
    if text.len() > limits.max_bytes {
        return Err(BoundedError::TooLarge {
            bytes: text.len(),
            max: limits.max_bytes,
        });
    }
    let budget = Budget {
        values: Cell::new(limits.max_values),
        string_bytes: Cell::new(limits.max_string_bytes),
        limits,
    };
    let de = serde_yaml_ng::Deserializer::from_str(text);
    Ok(T::deserialize(Charged {
        inner: de,
        budget: &budget,
    })?)
}

/// [`from_yaml`] for bytes that should be UTF-8 text (a file).
pub fn from_yaml_slice<T: de::DeserializeOwned>(
    bytes: &[u8],
    limits: Limits,
) -> Result<T, BoundedError> {
    if bytes.len() > limits.max_bytes {
        return Err(BoundedError::TooLarge {
            bytes: bytes.len(),
            max: limits.max_bytes,
        });
    }
    from_yaml(std::str::from_utf8(bytes)?, limits)
}

/// What is left to spend on one parse.
struct Budget {
    values: Cell<u64>,
    string_bytes: Cell<u64>,
    limits: Limits,
}

impl Budget {
    fn value<E: de::Error>(&self) -> Result<(), E> {
        match self.values.get().checked_sub(1) {
            Some(left) => {
                self.values.set(left);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "the document expands to more than {} values (anchors and aliases count each \
                 time they are used); write the repeated parts out, or less of them",
                self.limits.max_values
            ))),
        }
    }

    fn string<E: de::Error>(&self, len: usize) -> Result<(), E> {
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        match self.string_bytes.get().checked_sub(len) {
            Some(left) => {
                self.string_bytes.set(left);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "the document expands to more than {} bytes of strings (anchors and aliases \
                 count each time they are used)",
                self.limits.max_string_bytes
            ))),
        }
    }
}

/// A deserializer that charges each value it produces to the budget.
struct Charged<'b, D> {
    inner: D,
    budget: &'b Budget,
}

/// A visitor that charges strings, and wraps what it is handed next.
struct Charging<'b, V> {
    inner: V,
    budget: &'b Budget,
}

macro_rules! charged_methods {
    ($($method:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.budget.value::<D::Error>()?;
            self.inner.$method(Charging { inner: visitor, budget: self.budget })
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Charged<'_, D> {
    type Error = D::Error;

    charged_methods!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.budget.value::<D::Error>()?;
        self.inner.deserialize_unit_struct(
            name,
            Charging {
                inner: visitor,
                budget: self.budget,
            },
        )
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_newtype_struct(
            name,
            Charging {
                inner: visitor,
                budget: self.budget,
            },
        )
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.budget.value::<D::Error>()?;
        self.inner.deserialize_tuple(
            len,
            Charging {
                inner: visitor,
                budget: self.budget,
            },
        )
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.budget.value::<D::Error>()?;
        self.inner.deserialize_tuple_struct(
            name,
            len,
            Charging {
                inner: visitor,
                budget: self.budget,
            },
        )
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.budget.value::<D::Error>()?;
        self.inner.deserialize_struct(
            name,
            fields,
            Charging {
                inner: visitor,
                budget: self.budget,
            },
        )
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.budget.value::<D::Error>()?;
        self.inner.deserialize_enum(
            name,
            variants,
            Charging {
                inner: visitor,
                budget: self.budget,
            },
        )
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// A seed whose deserializer is charged.
struct ChargedSeed<'b, S> {
    inner: S,
    budget: &'b Budget,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for ChargedSeed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Charged {
            inner: d,
            budget: self.budget,
        })
    }
}

macro_rules! forward_visits {
    ($($method:ident($ty:ty)),* $(,)?) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Charging<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visits!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
    );

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        self.budget.string::<E>(v.len())?;
        self.inner.visit_str(v)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        self.budget.string::<E>(v.len())?;
        self.inner.visit_borrowed_str(v)
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
        self.budget.string::<E>(v.len())?;
        self.inner.visit_string(v)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<V::Value, E> {
        self.budget.string::<E>(v.len())?;
        self.inner.visit_bytes(v)
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<V::Value, E> {
        self.budget.string::<E>(v.len())?;
        self.inner.visit_borrowed_bytes(v)
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<V::Value, E> {
        self.budget.string::<E>(v.len())?;
        self.inner.visit_byte_buf(v)
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Charged {
            inner: d,
            budget: self.budget,
        })
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Charged {
            inner: d,
            budget: self.budget,
        })
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(ChargedAccess {
            inner: seq,
            budget: self.budget,
        })
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(ChargedAccess {
            inner: map,
            budget: self.budget,
        })
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(ChargedAccess {
            inner: data,
            budget: self.budget,
        })
    }
}

/// Sequence, map, enum and variant access whose elements are charged.
struct ChargedAccess<'b, A> {
    inner: A,
    budget: &'b Budget,
}

impl<'b, A> ChargedAccess<'b, A> {
    fn seed<S>(&self, inner: S) -> ChargedSeed<'b, S> {
        ChargedSeed {
            inner,
            budget: self.budget,
        }
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for ChargedAccess<'_, A> {
    type Error = A::Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        let seed = self.seed(seed);
        self.inner.next_element_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for ChargedAccess<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let seed = self.seed(seed);
        self.inner.next_key_seed(seed)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        let seed = self.seed(seed);
        self.inner.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, 'b, A: de::EnumAccess<'de>> de::EnumAccess<'de> for ChargedAccess<'b, A> {
    type Error = A::Error;
    type Variant = ChargedAccess<'b, A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), A::Error> {
        let budget = self.budget;
        let (value, variant) = self.inner.variant_seed(ChargedSeed {
            inner: seed,
            budget,
        })?;
        Ok((
            value,
            ChargedAccess {
                inner: variant,
                budget,
            },
        ))
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for ChargedAccess<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, A::Error> {
        let seed = self.seed(seed);
        self.inner.newtype_variant_seed(seed)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.inner.tuple_variant(
            len,
            Charging {
                inner: visitor,
                budget: self.budget,
            },
        )
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.inner.struct_variant(
            fields,
            Charging {
                inner: visitor,
                budget: self.budget,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// `n` aliases of one anchored list of `m` strings: n·m strings once
    /// expanded, from a document of about 10·(n + m) bytes.
    fn bomb(n: usize, m: usize) -> String {
        let mut y = String::from("base: &a [");
        y.push_str(&vec!["namespace-x"; m].join(","));
        y.push_str("]\nrepeat:\n");
        for _ in 0..n {
            y.push_str("  - *a\n");
        }
        y
    }

    #[derive(Debug, serde::Deserialize)]
    struct Doc {
        #[allow(dead_code)]
        base: Vec<String>,
        #[allow(dead_code)]
        repeat: Vec<Vec<String>>,
    }

    #[test]
    fn an_alias_bomb_is_refused_before_it_expands() {
        // 3,000 × 3,000 = 9 million strings from ~60 KB; serde_yaml_ng alone
        // expands it (16 s, 400 MB in issue 17's measurement).
        let text = bomb(3000, 3000);
        let err = from_yaml::<Doc>(&text, Limits::CONFIG)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("expands to more than 200000 values"), "{err}");
        // Into an untyped value, too.
        let err = from_yaml::<serde_yaml_ng::Value>(&text, Limits::CONFIG)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("expands to more than"), "{err}");
    }

    #[test]
    fn long_strings_repeated_by_aliases_are_refused() {
        let long = "x".repeat(60_000);
        let mut text = format!("base: &a {long}\nrepeat:\n");
        for _ in 0..100 {
            text.push_str("  - *a\n");
        }
        #[derive(Debug, serde::Deserialize)]
        struct Strings {
            #[allow(dead_code)]
            base: String,
            #[allow(dead_code)]
            repeat: Vec<String>,
        }
        let err = from_yaml::<Strings>(&text, Limits::CONFIG)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("bytes of strings"), "{err}");
    }

    #[test]
    fn ordinary_documents_and_modest_aliases_read_as_before() {
        let text = bomb(10, 10);
        let doc: Doc = from_yaml(&text, Limits::CONFIG).expect("a small one reads");
        assert_eq!(doc.repeat.len(), 10);
        let plain = "a: 1\nb: [x, y]\nc: {d: true, e: ~, f: 2.5}\n";
        let ours: BTreeMap<String, serde_yaml_ng::Value> =
            from_yaml(plain, Limits::CONFIG).expect("plain");
        let theirs: BTreeMap<String, serde_yaml_ng::Value> =
            serde_yaml_ng::from_str(plain).expect("plain");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_large_text_is_refused_by_its_size() {
        let text = format!("a: {}\n", "x".repeat(Limits::CONFIG.max_bytes));
        let err = from_yaml::<serde_yaml_ng::Value>(&text, Limits::CONFIG).expect_err("refused");
        assert!(matches!(err, BoundedError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn syntax_errors_keep_their_location() {
        let err = from_yaml::<serde_yaml_ng::Value>("a: [1, 2\nb: 3\n", Limits::CONFIG)
            .expect_err("bad yaml");
        let BoundedError::Yaml(e) = err else {
            panic!("a YAML error")
        };
        assert!(e.location().is_some(), "{e}");
    }
}
