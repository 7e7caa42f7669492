import ZtnaCore

/// A failed call into the core: the `ZTNA_*` code and the message the core recorded.
public struct ZtnaError: Error, CustomStringConvertible, Equatable {
    public let code: Int32
    public let message: String

    public var description: String { "ztna error \(code): \(message)" }

    /// The calling thread's last error message, read through the ABI.
    static func last(_ code: Int32) -> ZtnaError {
        let length = ztna_last_error_message(nil, 0)
        var buffer = [CChar](repeating: 0, count: length + 1)
        _ = ztna_last_error_message(&buffer, buffer.count)
        return ZtnaError(code: code, message: String(cString: buffer))
    }

    /// Throws unless `code` is `ZTNA_OK`.
    static func check(_ code: Int32) throws {
        if code != ZTNA_OK {
            throw ZtnaError.last(code)
        }
    }

    public var isBadHandle: Bool { code == ZTNA_ERR_BAD_HANDLE }
    public var isState: Bool { code == ZTNA_ERR_STATE }
}
