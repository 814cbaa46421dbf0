//! How the domain's enums are stored: each as the text of a `TEXT` column, the names the
//! migrations' CHECK constraints and triggers use. These names are also the ones the API
//! shows (`Display`), so they live in one place.

use std::fmt;

use sqlx::{encode::IsNull, error::BoxDynError, Database, Decode, Encode, Type};

use crate::domain::{ChatStatus, LedgerReason};

/// Maps an enum to and from its column text for every backend, and displays it so.
macro_rules! text_column {
    ($type:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $type {
            /// The name it is stored and shown under.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            fn from_column(text: &str) -> Option<Self> {
                match text {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
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
                Self::from_column(text).ok_or_else(|| {
                    format!("{text:?} is no {}", stringify!($type)).into()
                })
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

text_column!(ChatStatus {
    Pending => "pending",
    Answered => "answered",
    Failed => "failed",
    Abandoned => "abandoned",
});

text_column!(LedgerReason {
    InitialGrant => "initial_grant",
    Grant => "grant",
    ChatReservation => "chat_reservation",
    ChatRefund => "chat_refund",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_as_its_variant() {
        for status in [
            ChatStatus::Pending,
            ChatStatus::Answered,
            ChatStatus::Failed,
        ] {
            assert_eq!(ChatStatus::from_column(status.as_str()), Some(status));
        }
        for reason in [
            LedgerReason::InitialGrant,
            LedgerReason::Grant,
            LedgerReason::ChatReservation,
            LedgerReason::ChatRefund,
        ] {
            assert_eq!(LedgerReason::from_column(reason.as_str()), Some(reason));
        }
        assert_eq!(ChatStatus::from_column("Answered"), None);
    }
}
