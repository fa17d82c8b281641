//! The edges of the service: the gRPC API (handlers, proto <-> domain conversion,
//! status mapping, middleware, standard health) and the plain HTTP admin port.
//! Only this module knows protobuf types.

pub mod admin;
pub mod convert;
pub mod grpc;
pub mod health;
pub mod malformed;
pub mod middleware;
pub mod preface;
pub mod rpc;
pub mod status;
