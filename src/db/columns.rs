//! How the domain's enums are stored: each as the text of a `TEXT` column, its snake_case
//! name (derived with strum in `domain`), which the migrations' CHECK constraints and
//! triggers use and the API shows.

use sqlx::{encode::IsNull, error::BoxDynError, Database, Decode, Encode, Type};

use crate::domain::{ChatStatus, LedgerReason};

/// Maps an enum to and from its column text for every backend: its strum name (`as_str`,
/// `FromStr`), which the migrations' CHECK constraints and triggers use.
macro_rules! text_column {
    ($type:ident) => {
        impl $type {
            /// The name it is stored and shown under.
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }

        impl<DB: Database> Type<DB> for $type
        where
            str: Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <str as Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <str as Type<DB>>::compatible(ty)
            }
        }

        impl<'r, DB: Database> Decode<'r, DB> for $type
        where
            &'r str: Decode<'r, DB>,
        {
            fn decode(value: DB::ValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&'r str as Decode<'r, DB>>::decode(value)?;
                text.parse()
                    .map_err(|_| format!("{text:?} is no {}", stringify!($type)).into())
            }
        }

        impl<'q, DB: Database> Encode<'q, DB> for $type
        where
            &'q str: Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut DB::ArgumentBuffer<'q>,
            ) -> Result<IsNull, BoxDynError> {
                <&'q str as Encode<'q, DB>>::encode(self.as_str(), buf)
            }
        }
    };
}

text_column!(ChatStatus);
text_column!(LedgerReason);

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    #[test]
    fn every_name_reads_back_as_its_variant() {
        for status in ChatStatus::iter() {
            assert_eq!(status.as_str().parse(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
        }
        let names: Vec<_> = ChatStatus::iter().map(ChatStatus::as_str).collect();
        // The names the migrations' CHECK constraint allows.
        assert_eq!(names, ["pending", "answered", "failed", "abandoned"]);
        for reason in LedgerReason::iter() {
            assert_eq!(reason.as_str().parse(), Ok(reason));
        }
        let names: Vec<_> = LedgerReason::iter().map(LedgerReason::as_str).collect();
        assert_eq!(
            names,
            [
                "initial_grant",
                "grant",
                "chat_reservation",
                "chat_refund",
                "embedding",
                "embedding_refund",
                "chat_settlement",
                "embedding_settlement",
                "chat_charge",
                "embedding_charge"
            ]
        );
        assert!("Answered".parse::<ChatStatus>().is_err());
    }
}
