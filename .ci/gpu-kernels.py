#!/usr/bin/env python3
"""gpu-kernels.py: lists the kernels compiled into CUDA and HIP object files,
per architecture, and checks that every kernel source was compiled for every
requested architecture.

    gpu-kernels.py cuda OBJDIR ARCH... -- STEM...   (ARCH: 80, 90, 90a)
    gpu-kernels.py hip  OBJDIR ARCH... -- STEM...   (ARCH: gfx90a, gfx1030)

Each STEM (write, move, ...) names a kernels/STEM.cu whose object must hold
a kernel whose (mangled) name contains "STEM_kernel" in the device code of
every ARCH. CUDA objects carry an NVIDIA fat binary (.nv_fatbin: one ELF
cubin per sm, kernels are the .nv.info.<name> sections); HIP objects carry a
clang offload bundle (.hip_fatbin: one AMDGPU code object per gfx target,
kernels are the symbols <name>.kd). No CUDA or ROCm tool is needed.
Exit status 0 when every kernel is there, 1 otherwise.
"""
import glob
import os
import struct
import sys


def elf_sections(data):
    """[(name, type, offset, size, link)] of an ELF64 little-endian image."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for i in range(shnum):
        name, typ, _flags, _addr, off, size, link = struct.unpack_from(
            "<IIQQQQI", data, shoff + i * shentsize)
        raw.append((name, typ, off, size, link))
    str_off, str_size = raw[shstrndx][2], raw[shstrndx][3]
    strtab = data[str_off:str_off + str_size]
    out = []
    for name, typ, off, size, link in raw:
        end = strtab.find(b"\0", name)
        out.append((strtab[name:end].decode("latin-1"), typ, off, size, link))
    return out


def section(data, wanted):
    for name, _typ, off, size, _link in elf_sections(data):
        if name == wanted:
            return data[off:off + size]
    return None


def cubin_kernels(elf):
    return [n[len(".nv.info."):] for n, *_ in elf_sections(elf) if n.startswith(".nv.info.")]


def cuda_objects(path):
    """{sm: [kernel]} from the .nv_fatbin section of a host object."""
    data = open(path, "rb").read()
    fat = section(data, ".nv_fatbin")
    found = {}
    if fat is None:
        return found
    at = 0
    while at + 16 <= len(fat):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", fat, at)
        if magic != 0xBA55ED50:
            at += 8  # containers are 8-byte aligned
            continue
        entry, end = at + header_size, at + header_size + fat_size
        while entry + 0x20 <= end:
            kind, _v, ehdr, padded = struct.unpack_from("<HHII", fat, entry)
            sm, = struct.unpack_from("<I", fat, entry + 0x1C)
            payload = fat[entry + ehdr:entry + ehdr + padded]
            if kind == 2:  # ELF (cubin)
                names = cubin_kernels(payload) if payload[:4] == b"\x7fELF" else ["<compressed>"]
                found.setdefault(str(sm), []).extend(names)
            elif kind == 1:
                found.setdefault("ptx_" + str(sm), []).append("<ptx>")
            if ehdr == 0 or padded == 0:
                break
            entry += ehdr + padded
        at = end
    return found


def amdgpu_kernels(elf):
    names = []
    secs = elf_sections(elf)
    for _name, typ, off, size, link in secs:
        if typ not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        str_off, str_size = secs[link][2], secs[link][3]
        strtab = elf[str_off:str_off + str_size]
        for i in range(size // 24):
            st_name, = struct.unpack_from("<I", elf, off + i * 24)
            end = strtab.find(b"\0", st_name)
            sym = strtab[st_name:end].decode("latin-1")
            if sym.endswith(".kd"):
                names.append(sym[:-3])
    return sorted(set(names))


def hip_objects(path):
    """{gfx: [kernel]} from the .hip_fatbin section (clang offload bundle)."""
    data = open(path, "rb").read()
    fat = section(data, ".hip_fatbin")
    found = {}
    if fat is None:
        return found
    magic = b"__CLANG_OFFLOAD_BUNDLE__"
    at = fat.find(magic)
    while at >= 0:
        n, = struct.unpack_from("<Q", fat, at + len(magic))
        p = at + len(magic) + 8
        for _ in range(n):
            off, size, id_len = struct.unpack_from("<QQQ", fat, p)
            bundle_id = fat[p + 24:p + 24 + id_len].decode("latin-1")
            p += 24 + id_len
            if "amdgcn" in bundle_id:
                gfx = bundle_id.rsplit("-", 1)[-1].split(":")[0]
                found.setdefault(gfx, []).extend(amdgpu_kernels(fat[at + off:at + off + size]))
        at = fat.find(magic, p)
    return found


def main(argv):
    if len(argv) < 4 or "--" not in argv:
        print(__doc__)
        return 2
    api, objdir = argv[1], argv[2]
    sep = argv.index("--")
    archs, stems = argv[3:sep], argv[sep + 1:]
    ok = True
    for stem in stems:
        if api == "cuda":
            objs = glob.glob(os.path.join(objdir, "**", "*" + stem + ".cu.o"), recursive=True)
            objs = [o for o in objs if os.path.basename(o).endswith("_" + stem + ".cu.o")]
            reader = cuda_objects
        else:
            objs = glob.glob(os.path.join(objdir, "**", stem + ".hip.o"), recursive=True)
            reader = hip_objects
        if not objs:
            print("%s %-10s no object file under %s" % (api, stem, objdir))
            ok = False
            continue
        found = reader(objs[0])
        for arch in archs:
            names = [k for k in found.get(arch, []) if stem + "_kernel" in k]
            status = "ok" if names else "MISSING"
            if not names:
                ok = False
            print("%s %-10s %-8s %2d kernel(s) %s" % (api, stem, arch, len(names), status))
        extra = sorted(a for a in found if a not in archs)
        if extra:
            print("%s %-10s also: %s" % (api, stem, ", ".join(extra)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
