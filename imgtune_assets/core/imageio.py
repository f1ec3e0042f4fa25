"""Reading and writing images with clear errors, for any path (spaces, non-ASCII)."""

from __future__ import annotations

import os
import zlib
from struct import error as struct_error
from pathlib import Path

import cv2
import numpy as np

from imgtune_assets.core.files import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


# The formats OpenCV encodes, by the signature their files begin with, and the suffix that selects the
# encoder (``format_suffix``).
_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"II*\x00", ".tiff"),
               (b"MM\x00*", ".tiff"), (b"BM", ".bmp"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"))


def format_suffix(data: bytes) -> str | None:
    """The suffix of the format that file bytes ``data`` are in, whatever the file is named (a PNG named
    ``.jpg`` is a PNG): ``.jpg``, ``.png``, ``.tiff``, ``.webp``, ``.bmp`` or ``.gif``; None for others."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for signature, suffix in _SIGNATURES if data.startswith(signature)), None)


# Decodes in this process, so a run can report how often each image was decoded.
_decode_count = 0


def decode_count() -> int:
    return _decode_count


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's (or object's) bytes, with a clear error naming it."""
    from imgtune_assets.core import storage

    try:
        return storage.read_bytes(path)
    except storage.StorageError as exc:
        raise ImageReadError(str(exc)) from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image: grey stays 2-D, colour is BGR (alpha dropped), 8 or 16 bit, turned upright by
    its EXIF orientation as ``cv2.imread`` turns it (``orient``).

    Reads bytes in Python and decodes in memory so that any file name (and any URL) works.
    """
    return decode_image(read_bytes(path), path)


def probe_image(data: bytes, file: str | os.PathLike, *, whole: bool = True) -> tuple[int, int, int, str]:
    """(width, height, channels, dtype) of an encoded image from its header, without decoding pixels:
    the size ``decode_image`` gives, i.e. after its EXIF orientation (``orient``).

    The channels and dtype are those ``decode_image`` gives (grey stays 1 channel, alpha is dropped).
    With ``whole`` (``data`` is the whole file), its structure is checked too: a PNG's chunks and their
    checksums up to the end chunk (Pillow's ``verify``), a JPEG's end-of-image marker — what catches
    truncated and damaged files. Raises ``ImageReadError`` naming ``file``.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageReadError(f"{file}: empty file (0 bytes)")
    if not whole and (size := webp_size(data)) is not None and not webp_has_exif(data):
        # Pillow opens a WebP only whole; an object's head holds its size (WebP is 8-bit colour). Not
        # when it holds Exif (after the image data): its orientation may turn that size, so it is read whole.
        return size[0], size[1], 3, "uint8"
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, mode, (width, height) = image.format, image.mode, image.size
            bits = image.tag_v2.get(258) if kind == "TIFF" else None
            # decode_image's size: turned a quarter by an EXIF orientation of 5–8 (see orient). (A TIFF's
            # own orientation tag: OpenCV's decoder applies it, and Pillow's size is already the turned one.)
            if _orientation_of(image, data) >= 5:
                width, height = height, width
        if whole and kind == "PNG":
            check_png_chunks(data)
    except _pillow_open_errors() as exc:
        # Pillow opens no TIFF of 32-bit or floating-point colour: a well-formed one is said to be what
        # it is, as decoding it would (decode_image), not taken for a damaged file.
        if (pixel_type := tiff_pixel_type(data)) is not None and pixel_type not in ("uint8", "uint16"):
            raise ImageReadError(f"{file}: unsupported pixel type {pixel_type} (need 8-bit or 16-bit)") from None
        # Pillow names the unrecognised file by its in-memory buffer's address: said without it.
        detail = "no known image format" if isinstance(exc, UnidentifiedImageError) else exc
        raise ImageReadError(f"{file}: not a decodable image (corrupt, truncated or not an image: {detail})") from None
    # A JPEG's end-of-image marker cannot occur inside its entropy-coded data (0xFF is stuffed there), so
    # one after the start of scan means the scan is whole, whatever a camera appends after it (some
    # phones append a video to the photo). Searched from the end: a forward search through the scan,
    # full of 0xFF bytes, is slow and holds the GIL.
    if whole and kind == "JPEG" and data.rfind(b"\xff\xd9") < max(0, data.find(b"\xff\xda")):
        raise ImageReadError(f"{file}: not a decodable image (truncated JPEG: no end-of-image marker)")
    if whole and kind == "TIFF":
        check_tiff_structure(data, file)
    if whole and kind == "BMP" and len(data) < int.from_bytes(data[2:6], "little"):
        raise ImageReadError(f"{file}: not a decodable image (truncated BMP)")
    if whole and kind == "WEBP" and len(data) < 8 + int.from_bytes(data[4:8], "little"):
        raise ImageReadError(f"{file}: not a decodable image (truncated WebP)")
    grey = mode in ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F", "La")
    depth = 8
    if kind == "PNG" and len(data) > 24:
        depth = data[24]  # IHDR bit depth: Pillow shows a 16-bit colour PNG as 8-bit RGB
    elif bits is not None:
        depth = max(bits) if isinstance(bits, tuple) else int(bits)
    elif mode.startswith("I;16"):
        depth = 16
    if depth > 16 or mode in ("I", "F"):
        named = tiff_pixel_type(data) if kind == "TIFF" else None
        raise ImageReadError(f"{file}: unsupported pixel type {named} (need 8-bit or 16-bit)" if named else
                             f"{file}: unsupported pixel type ({mode}, {depth} bit; need 8-bit or 16-bit)")
    return int(width), int(height), 1 if grey else 3, "uint16" if depth == 16 else "uint8"


def _pillow_open_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises on bytes it cannot open as an image (unknown, damaged, truncated, too large)."""
    from PIL import Image, UnidentifiedImageError

    return UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError


def tiff_directories(data: bytes, limit: int = 100_000) -> list:
    """A (classic, not Big-) TIFF's image file directories in file order, read by Pillow's TIFF
    directory reader (which does not need Pillow to support the pixels): empty when ``data`` is no
    TIFF; the chain stops at a directory beyond ``data``, an unreadable one, a loop or ``limit``."""
    import io
    import warnings

    from PIL import TiffImagePlugin

    if data[:4] not in (b"II*\0", b"MM\0*"):
        return []
    directories: list = []
    seen: set[int] = set()
    stream = io.BytesIO(data)
    with warnings.catch_warnings():  # Pillow warns of every tag it cannot read: the answers say enough
        warnings.simplefilter("ignore")
        try:
            offset = TiffImagePlugin.ImageFileDirectory_v2(data[:8]).next
        except (OSError, ValueError, SyntaxError, struct_error, EOFError):
            return []
        while offset and offset < len(data) and offset not in seen and len(seen) < limit:
            seen.add(offset)
            directory = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
            stream.seek(offset)
            try:
                directory.load(stream)
            except (OSError, ValueError, SyntaxError, struct_error, EOFError):
                break
            directories.append(directory)
            offset = directory.next
    return directories


def check_tiff_structure(data: bytes, file: str | os.PathLike) -> None:
    """Refuse, naming ``file``, a whole TIFF that holds more than one image (a z-stack, a time series,
    an ImageJ hyperstack: OpenCV decodes the first page only, so the others would be scored and written
    as nothing) or whose first image's strips or tiles end beyond the file (a copy cut short, which the
    header alone does not show). Reduced-resolution copies (thumbnails: NewSubfileType bit 0) are not
    pages."""
    directories = tiff_directories(data)
    pages = sum(1 for d in directories if not int(d.get(254, 0) or 0) & 1)
    description = str(directories[0].get(270, "")) if directories else ""
    if description.startswith("ImageJ="):  # ImageJ may store a stack's pages behind one directory
        fields = dict(line.partition("=")[::2] for line in description.splitlines())
        if fields.get("images", "").strip().isdigit():
            pages = max(pages, int(fields["images"]))
    if pages > 1:
        raise ImageReadError(f"{file}: a multi-page TIFF ({pages} pages): imgtune reads one image per file "
                             "(OpenCV would read the first page only); save each page as its own file")
    if not directories:
        return
    first = directories[0]
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles
        offsets, counts = first.get(offsets_tag), first.get(counts_tag)
        if offsets is None or counts is None:
            continue
        offsets = offsets if isinstance(offsets, tuple) else (offsets,)
        counts = counts if isinstance(counts, tuple) else (counts,)
        end = max((int(o) + int(c) for o, c in zip(offsets, counts)), default=0)
        if end > len(data):
            raise ImageReadError(f"{file}: not a decodable image (truncated TIFF: its image data ends at byte "
                                 f"{end}, the file at byte {len(data)})")


def tiff_pixel_type(data: bytes) -> str | None:
    """A TIFF's sample type as numpy names it (``float32``, ``uint16``, ``int32``...) from its first
    directory's BitsPerSample and SampleFormat tags, or None when ``data`` is no readable TIFF."""
    directories = tiff_directories(data, limit=1)
    if not directories:
        return None
    directory = directories[0]
    if not all(tag in directory for tag in (256, 257, 258)):  # width, length, bits per sample
        return None
    bits, formats = directory[258], directory.get(339, (1,))
    bits = max(bits) if isinstance(bits, tuple) else int(bits)
    kind = {1: "uint", 2: "int", 3: "float"}.get(max(formats) if isinstance(formats, tuple) else int(formats), "uint")
    return f"{kind}{bits}"


def webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a WebP file from its first chunk's header (the first 30 bytes), or None when
    ``data`` does not start like a WebP file."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    kind = data[12:16]
    if kind == b"VP8X":  # extended: canvas size minus one, 24 bits each
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8L" and data[20] == 0x2F:  # lossless: signature, then 14-bit sizes minus one
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: key frame start code, then 14-bit sizes
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def webp_has_exif(data: bytes) -> bool:
    """Whether an extended WebP's header says the file holds Exif (its VP8X flags' Exif bit)."""
    return len(data) > 20 and data[12:16] == b"VP8X" and bool(data[20] & 0x08)


def webp_is_lossless(data: bytes) -> bool:
    """Whether a WebP file's image is stored lossless (a ``VP8L`` chunk) rather than lossy (``VP8 ``),
    so that a processed copy can be written the same way. Walks the RIFF chunks (an extended file,
    ``VP8X``, holds its image chunk after others); an animation or an unknown layout counts as lossy."""
    pos = 12  # after "RIFF", the size and "WEBP"
    while pos + 8 <= len(data):
        kind = data[pos:pos + 4]
        if kind == b"VP8L":
            return True
        if kind == b"VP8 ":
            return False
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    return False


# The JPEG segments that describe a photo rather than its pixels and stay true of it after a filter:
# Exif (orientation, camera, time) and XMP in APP1, the ICC colour profile in APP2.
EXIF_ID = b"Exif\x00\x00"
XMP_IDS = (b"http://ns.adobe.com/xap/1.0/\x00", b"http://ns.adobe.com/xmp/extension/\x00")
ICC_ID = b"ICC_PROFILE\x00"
MPF_ID = b"MPF\x00"
ICC_SPACE_OF_CHANNELS = {1: b"GRAY", 3: b"RGB "}


def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of a JPEG's segments before its first frame or scan; [] for anything else or a
    malformed header."""
    if data[:2] != b"\xff\xd8":
        return []
    segments, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker == 0xDA or 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            break  # the first frame or scan: metadata comes before
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if length < 2 or at + 2 + length > len(data):
            return []
        segments.append((marker, data[at + 4:at + 2 + length]))
        at += 2 + length
    return segments


def jpeg_metadata(data: bytes, channels: int) -> list[bytes]:
    """The segments of JPEG ``data`` to keep in a filtered output of ``channels`` channels, whole, in
    file order: Exif; XMP unless the file holds more images than its first (an MPF index: an Ultra HDR
    gain map, a depth map, a second frame — not kept, so neither is the XMP that points at them); the
    ICC profile when its colour space is the output's (a grey output of a colour photo gets none)."""
    segments = _jpeg_segments(data)
    multi = any(m == 0xE2 and payload.startswith(MPF_ID) for m, payload in segments)
    icc = [payload for m, payload in segments if m == 0xE2 and payload.startswith(ICC_ID)]
    first = next((c for c in icc if len(c) > 14 and c[12] == 1), None)  # chunk 1 holds the profile header
    icc_fits = first is not None and first[14 + 16:14 + 20] == ICC_SPACE_OF_CHANNELS.get(channels)
    kept = []
    for marker, payload in segments:
        keep = ((marker == 0xE1 and payload.startswith(EXIF_ID))
                or (marker == 0xE1 and payload.startswith(XMP_IDS) and not multi)
                or (marker == 0xE2 and payload.startswith(ICC_ID) and icc_fits))
        if keep:
            kept.append(b"\xff" + bytes([marker]) + (len(payload) + 2).to_bytes(2, "big") + payload)
    return kept


def with_jpeg_metadata(encoded: bytes, segments: list[bytes]) -> bytes:
    """``encoded`` (a JPEG that OpenCV wrote: SOI, then its JFIF APP0) with ``segments`` put after its
    APP0, where readers look for Exif and ICC segments."""
    if not segments or encoded[:2] != b"\xff\xd8":
        return encoded
    at = 2
    if encoded[2:4] == b"\xff\xe0":
        at = 4 + int.from_bytes(encoded[4:6], "big")
    return encoded[:at] + b"".join(segments) + encoded[at:]


def check_png_chunks(data: bytes) -> None:
    """A PNG's structure, as Pillow's ``verify`` checks it: every chunk's type a name, the chunk whole
    and its CRC right, up to the end chunk. Raises ``SyntaxError`` naming the first bad chunk.

    Written out because Pillow's ``verify`` reads a large PNG's thousands of chunks in Python with
    the GIL held (serial across the manifest's threads, and slower than hashing the file); here each
    CRC is one ``zlib.crc32`` call on a view of the file, which releases the GIL.
    """
    view = memoryview(data)
    pos, size = 8, len(data)
    while True:
        if pos + 8 > size:
            raise SyntaxError(f"truncated PNG: no end chunk (file ends at byte {size})")
        length = int.from_bytes(view[pos:pos + 4], "big")
        kind = bytes(view[pos + 4:pos + 8])
        if not kind.isalpha():
            raise SyntaxError(f"broken PNG: chunk type {kind!r} at byte {pos}")
        if kind == b"IEND":  # (Pillow does not check the end chunk's CRC either)
            return
        end = pos + 8 + length
        if end + 4 > size:
            raise SyntaxError(f"truncated PNG: chunk {kind!r} at byte {pos} runs past the end of the file")
        if zlib.crc32(view[pos + 4:end]) != int.from_bytes(view[end:end + 4], "big"):
            raise SyntaxError(f"broken PNG: CRC error in chunk {kind!r} at byte {pos}")
        pos = end + 4


# EXIF orientation (tag 0x0112) is applied where cv2.imread applies it: JPEG, PNG (an eXIf chunk before
# or after the image data) and WebP. A TIFF's own
# orientation tag OpenCV's TIFF decoder applies itself, even with IMREAD_UNCHANGED, which skips the
# others. A phone's portrait photo is stored landscape with orientation 6: it is scored, shown and
# processed upright, as OpenCV (and every viewer and labelling tool) shows it.
ORIENTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # (MPO: a JPEG holding further images, as phones write)
EXIF_ORIENTATION = 0x0112


def _png_exif(data: bytes) -> bytes | None:
    """The payload of a PNG's eXIf chunk wherever it lies (after the image data too, where Pillow finds
    it only by decoding and OpenCV still applies it), walking the chunks' headers only; None if there is
    none in ``data`` (which may be the file's head only)."""
    pos, size = 8, len(data)
    while pos + 8 <= size:
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"eXIf":
            return data[pos + 8:pos + 8 + length] if pos + 8 + length <= size else None
        if kind == b"IEND":
            return None
        pos += 12 + length
    return None


def _orientation_of(image, data: bytes = b"") -> int:
    """The EXIF orientation (1–8; 1 when absent, unreadable or out of range) of a Pillow image opened on
    a file's bytes ``data``, read from the metadata Pillow found while opening it, or a PNG's eXIf chunk
    after its image data (nothing decoded)."""
    from PIL import Image

    raw = image.info.get("exif") if image.format in ORIENTED_FORMATS else None
    if not raw and image.format == "PNG":
        raw = _png_exif(data)
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
        value = exif.get(EXIF_ORIENTATION, 1)
    except (SyntaxError, ValueError, TypeError, OSError, struct_error, KeyError, IndexError):
        return 1  # damaged Exif: shown as stored, as OpenCV does
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation ``decode_image`` applies to these file bytes (1: none)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return _orientation_of(image, data)
    except _pillow_open_errors():
        return 1


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` as stored, turned upright for its EXIF ``orientation``: OpenCV's own steps
    (``ApplyExifOrientation``: 2 mirrors, 3 turns half, 4 flips, 5–8 transpose first). Grey or colour."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        raise ValueError(f"orient needs a 2-D (grey) or 3-D (colour) image array, got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    if orientation not in range(1, 9):
        raise ValueError(f"EXIF orientation must be 1 to 8, got {orientation!r}")
    if orientation in (5, 6, 7, 8):
        image = image.swapaxes(0, 1)
    flip = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}.get(orientation)
    if flip == 1:
        image = image[:, ::-1]
    elif flip == 0:
        image = image[::-1]
    elif flip == -1:
        image = image[::-1, ::-1]
    return np.ascontiguousarray(image)


def unorient(image: np.ndarray, orientation: int) -> np.ndarray:
    """The inverse of ``orient``: an upright image back as a file of that orientation stores it
    (6 and 8 are each other's inverse; every other step undoes itself)."""
    return orient(image, {6: 8, 8: 6}.get(orientation, orientation))


def decode_image(data: bytes, file: str | os.PathLike) -> np.ndarray:
    """Decode already-read file bytes (``file`` names them in errors); see ``read_image``."""
    return decode_oriented(data, file)[0]


def decode_oriented(data: bytes, file: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, int]:
    """``decode_image``'s image; the alpha channel it drops (None when the file has none), for writing
    a processed image back with its transparency; both upright, and the EXIF orientation that turned
    them (``orient``; 1: as stored)."""
    image, alpha = _decode_stored(data, file)
    orientation = exif_orientation(data)
    if orientation != 1:
        image = orient(image, orientation)
        alpha = orient(alpha, orientation) if alpha is not None else None
    return image, alpha, orientation


def _decode_stored(data: bytes, file: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """The pixels as stored (IMREAD_UNCHANGED keeps 16 bits and alpha, and ignores EXIF orientation)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size == 0:
        raise ImageReadError(f"{file}: empty file (0 bytes)")
    global _decode_count
    _decode_count += 1
    check_tiff_structure(data, file)  # (nothing to do for any other format)
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(f"{file}: not a decodable image (corrupt, truncated or not an image)")
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"{file}: unsupported pixel type {image.dtype} (need 8-bit or 16-bit)")
    alpha = None
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[:, :, 0]
        elif image.shape[2] == 4:
            alpha = np.ascontiguousarray(image[:, :, 3])
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
            # OpenCV decodes a grey + alpha PNG as BGRA with B = G = R: it was stored grey, keep it grey.
            if np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(image[:, :, 1], image[:, :, 2]):
                image = image[:, :, 0]
        elif image.shape[2] != 3:
            raise ImageReadError(f"{file}: unsupported channel count {image.shape[2]}")
    elif image.ndim != 2:
        raise ImageReadError(f"{file}: unsupported image shape {image.shape}")
    return np.ascontiguousarray(image), alpha


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Encode ``image`` (8 or 16 bits; grey, BGR or BGRA) as PNG and write it atomically."""
    # OpenCV would convert other pixel types to 8 bits with only a warning: a silently different file.
    if not isinstance(image, np.ndarray) or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: PNG needs an 8-bit or 16-bit image array, got "
                         f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.size == 0 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise ValueError(f"{path}: PNG needs a grey, BGR or BGRA image, got shape {image.shape}")
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode image of shape {image.shape} {image.dtype}")
    return atomic_write_bytes(path, buffer.tobytes())
