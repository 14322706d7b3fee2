-- Wireshark / tshark dissector for the bitmig dirty-bitmap migration protocol.
--
-- Each frame is a 4-byte big-endian body length followed by one msgpack map whose
-- "kind" field names the frame (bitmig/protocol/spec.py, Kind and FIELDS). Frames are
-- found across TCP segments with dissect_tcp_pdus; header fields are shown by name and
-- a bits frame's payload by its length.
--
-- Use:
--   wireshark -X lua_script:proto/bitmig.lua capture.pcap
--   tshark -r capture.pcap -o tcp.reassemble_out_of_order:TRUE \
--     -X lua_script:proto/bitmig.lua -d tcp.port==7800,bitmig
-- or copy this file to ~/.local/lib/wireshark/plugins/. Port 7800 is registered; any
-- other port via "Decode As..." (-d tcp.port==PORT,bitmig) or the bitmig.port preference.
-- Display filters: bitmig, bitmig.kind == 4, bitmig.id == 0, bitmig.payload_len > 0 ...

local bitmig = Proto("bitmig", "bitmig dirty bitmap migration")

local KINDS = {
    [1] = "hello", [2] = "start", [3] = "ready", [4] = "bits", [5] = "zeroes",
    [6] = "complete", [7] = "ack", [8] = "error", [9] = "end", [10] = "mark",
    [11] = "spans",
}
local ENCODINGS = {
    [0x00] = "raw", [0x01] = "positions", [0x02] = "runs",
    [0x10] = "raw+zlib", [0x11] = "positions+zlib", [0x12] = "runs+zlib",
}

local f = {
    length = ProtoField.uint32("bitmig.length", "Body length", base.DEC),
    kind = ProtoField.uint8("bitmig.kind", "Kind", base.DEC, KINDS),
    kind_name = ProtoField.string("bitmig.kind_name", "Kind name"),
    id = ProtoField.uint32("bitmig.id", "Bitmap id", base.DEC),
    version = ProtoField.uint16("bitmig.version", "Version", base.DEC),
    min_version = ProtoField.uint16("bitmig.min_version", "Minimum version", base.DEC),
    role = ProtoField.string("bitmig.role", "Role"),
    caps = ProtoField.string("bitmig.cap", "Capability"),
    agent = ProtoField.string("bitmig.agent", "Agent"),
    node = ProtoField.string("bitmig.node", "Node"),
    name = ProtoField.string("bitmig.name", "Bitmap name"),
    disk_size = ProtoField.uint64("bitmig.disk_size", "Disk size", base.DEC),
    granularity = ProtoField.uint64("bitmig.granularity", "Granularity", base.DEC),
    chunk_size = ProtoField.uint64("bitmig.chunk_size", "Chunk size", base.DEC),
    enabled = ProtoField.bool("bitmig.enabled", "Enabled"),
    persistent = ProtoField.bool("bitmig.persistent", "Persistent"),
    live = ProtoField.bool("bitmig.live", "Live"),
    first = ProtoField.uint64("bitmig.first", "First chunk", base.DEC),
    count = ProtoField.uint64("bitmig.count", "Count", base.DEC),
    enc = ProtoField.uint8("bitmig.enc", "Encoding", base.HEX, ENCODINGS),
    payload_len = ProtoField.uint32("bitmig.payload_len", "Payload length", base.DEC),
    digest = ProtoField.bytes("bitmig.digest", "Digest"),
    code = ProtoField.string("bitmig.code", "Error code"),
    message = ProtoField.string("bitmig.message", "Error message"),
    seq = ProtoField.uint64("bitmig.seq", "Mark sequence", base.DEC),
    token = ProtoField.bytes("bitmig.token", "Resume token"),
    have = ProtoField.bytes("bitmig.have", "Chunks held (encoded mask)"),
    have_enc = ProtoField.uint8("bitmig.have_enc", "Encoding of have", base.HEX, ENCODINGS),
    runs = ProtoField.string("bitmig.runs", "Runs (first+count, ...)"),
    run_count = ProtoField.uint32("bitmig.run_count", "Runs", base.DEC),
    run_chunks = ProtoField.uint64("bitmig.run_chunks", "Chunks in runs", base.DEC),
    other = ProtoField.string("bitmig.field", "Field"),
}
bitmig.fields = f
-- Fields declared uint64: Lua numbers must become UInt64 before they are added.
local U64 = { disk_size = true, granularity = true, chunk_size = true, first = true,
              count = true, seq = true }

local e_malformed = ProtoExpert.new("bitmig.malformed", "Malformed bitmig frame",
                                    expert.group.MALFORMED, expert.severity.ERROR)
bitmig.experts = { e_malformed }

bitmig.prefs.port = Pref.uint("TCP port", 7800, "The destination's TCP port")

-- Minimal msgpack reader: returns value, kind ("int"/"str"/"bin"/"bool"/"nil"/"array"/
-- "map"), the offset after the value, and for bin the (offset, length) of the bytes.
local function mp_read(tvb, off)
    local b = tvb(off, 1):uint()
    off = off + 1
    if b <= 0x7f then return b, "int", off end
    if b >= 0xa0 and b <= 0xbf then
        local n = b - 0xa0
        return tvb(off, n):string(ENC_UTF_8), "str", off + n
    end
    if b >= 0x80 and b <= 0x8f then return b - 0x80, "map", off end
    if b >= 0x90 and b <= 0x9f then return b - 0x90, "array", off end
    if b == 0xc0 then return nil, "nil", off end
    if b == 0xc2 then return false, "bool", off end
    if b == 0xc3 then return true, "bool", off end
    if b == 0xcc then return tvb(off, 1):uint(), "int", off + 1 end
    if b == 0xcd then return tvb(off, 2):uint(), "int", off + 2 end
    if b == 0xce then return tvb(off, 4):uint(), "int", off + 4 end
    if b == 0xcf then return tvb(off, 8):uint64(), "int", off + 8 end
    if b == 0xd9 or b == 0xda or b == 0xdb then
        local w = (b == 0xd9) and 1 or ((b == 0xda) and 2 or 4)
        local n = tvb(off, w):uint()
        return tvb(off + w, n):string(ENC_UTF_8), "str", off + w + n
    end
    if b == 0xc4 or b == 0xc5 or b == 0xc6 then
        local w = (b == 0xc4) and 1 or ((b == 0xc5) and 2 or 4)
        local n = tvb(off, w):uint()
        return n, "bin", off + w + n, off + w
    end
    if b == 0xdc then return tvb(off, 2):uint(), "array", off + 2 end
    if b == 0xde then return tvb(off, 2):uint(), "map", off + 2 end
    error(string.format("unsupported msgpack type 0x%02x", b))
end

-- A spans frame's run list: LEB128 numbers in (skip, count) pairs (PROTOCOL.md, SPANS).
-- Returns the runs as "first+count" strings, their number and the chunks they cover.
local MAX_SHOWN_RUNS = 64
local function spans_runs(tvb, off, len)
    local vals, v, shift = {}, 0, 0
    for i = 0, len - 1 do
        local b = tvb(off + i, 1):uint()
        v = v + (b % 128) * 2 ^ shift
        shift = shift + 7
        if b < 128 then
            vals[#vals + 1] = v
            v, shift = 0, 0
        end
    end
    if shift ~= 0 or #vals % 2 ~= 0 then error("spans.runs is not (skip, count) pairs") end
    local out, pos, chunks = {}, 0, 0
    for i = 1, #vals, 2 do
        local first = pos + vals[i]
        if #out < MAX_SHOWN_RUNS then
            out[#out + 1] = string.format("%.0f+%.0f", first, vals[i + 1])
        end
        pos = first + vals[i + 1]
        chunks = chunks + vals[i + 1]
    end
    if #vals / 2 > MAX_SHOWN_RUNS then out[#out + 1] = "..." end
    return table.concat(out, ", "), #vals / 2, chunks
end

local function frame_len(tvb, pinfo, offset)
    return 4 + tvb(offset, 4):uint()
end

local function dissect_frame(tvb, pinfo, tree)
    local body_len = tvb(0, 4):uint()
    local item = tree:add(bitmig, tvb(), "bitmig")
    item:add(f.length, tvb(0, 4))
    local summary = {}
    local kind_name = "?"
    local ok, err = pcall(function()
        local n, t, off = mp_read(tvb, 4)
        if t ~= "map" then error("frame body is not a msgpack map") end
        for _ = 1, n do
            local key, kt, voff = mp_read(tvb, off)
            if kt ~= "str" then error("map key is not a string") end
            local val, vt, nxt, bin_off = mp_read(tvb, voff)
            local range = tvb(voff, nxt - voff)
            if key == "kind" then
                kind_name = KINDS[val] or ("kind " .. tostring(val))
                item:add(f.kind, range, val)
                item:add(f.kind_name, range, kind_name)
            elseif vt == "array" then
                local names = {}
                local aoff = nxt
                for _ = 1, val do
                    local s, st, after = mp_read(tvb, aoff)
                    if st ~= "str" then error(key .. " items must be strings") end
                    if key == "caps" then
                        item:add(f.caps, tvb(aoff, after - aoff), s)
                    end
                    names[#names + 1] = s
                    aoff = after
                end
                nxt = aoff
                if key ~= "caps" then
                    item:add(f.other, tvb(voff, nxt - voff), key .. ": " ..
                             table.concat(names, ", "))
                end
            elseif vt == "bin" then
                if key == "data" then
                    item:add(f.payload_len, range, val):append_text(" bytes")
                    summary[#summary + 1] = "payload=" .. val .. "B"
                elseif key == "digest" or key == "token" or key == "have" then
                    item:add(f[key], tvb(bin_off, val))
                elseif key == "runs" then
                    local text, n, chunks = spans_runs(tvb, bin_off, val)
                    item:add(f.runs, tvb(bin_off, val), text)
                    item:add(f.run_count, range, n)
                    item:add(f.run_chunks, range, UInt64(chunks))
                    summary[#summary + 1] = "runs=" .. n .. " chunks=" .. string.format(
                        "%.0f", chunks)
                else
                    item:add(f.other, range, key .. ": <" .. val .. " bytes>")
                end
            elseif f[key] ~= nil then
                if U64[key] and type(val) == "number" then val = UInt64(val) end
                item:add(f[key], range, val)
                if key ~= "agent" and key ~= "message" then
                    summary[#summary + 1] = key .. "=" .. tostring(val)
                end
            else
                item:add(f.other, range, key .. ": " .. tostring(val))
            end
            off = nxt
        end
        if off ~= 4 + body_len then error("bytes after the msgpack map") end
    end)
    if not ok then
        item:add_proto_expert_info(e_malformed, tostring(err))
    end
    item:append_text(", " .. kind_name)
    return kind_name, table.concat(summary, " ")
end

function bitmig.dissector(tvb, pinfo, tree)
    pinfo.cols.protocol = "bitmig"
    local kinds = {}
    local consumed = dissect_tcp_pdus(tvb, tree, 4, frame_len, function(ftvb, fpinfo, ftree)
        local k, s = dissect_frame(ftvb, fpinfo, ftree)
        kinds[#kinds + 1] = (s ~= "") and (k .. " " .. s) or k
        return ftvb:len()
    end, true)
    if #kinds > 0 then
        pinfo.cols.info = table.concat(kinds, "; ")
    end
    return consumed
end

local tcp_port = DissectorTable.get("tcp.port")
local registered = 0

local function register_port()
    if registered ~= 0 then tcp_port:remove(registered, bitmig) end
    registered = bitmig.prefs.port
    if registered ~= 0 then tcp_port:add(registered, bitmig) end
end

function bitmig.prefs_changed()
    register_port()
end

register_port()
tcp_port:add_for_decode_as(bitmig)
