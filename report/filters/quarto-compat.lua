-- Minimal Quarto compatibility for rendering report.qmd with plain pandoc:
--   1. {{< include PATH >}} paragraphs are replaced by the parsed blocks of PATH (relative to the .qmd folder);
--   2. figures with ids `fig-...` (and tables with `tbl-...`) are numbered, captions get "Figure N: ";
--   3. @fig-... / @tbl-... citations become links "Figure N" / "Table N";
--   4. Divs .callout-{note,warning,important,tip,caution} become boxes with a title (attribute `title` or default).

local base_dir = "."
if PANDOC_STATE.input_files[1] then
  base_dir = pandoc.path.directory(PANDOC_STATE.input_files[1])
end

local function expand_includes(blocks, depth)
  local out = pandoc.Blocks({})
  for _, blk in ipairs(blocks) do
    local path = blk.t == "Para" and pandoc.utils.stringify(blk):match("^{{<%s*include%s+(%S+)%s*>}}$")
    if path and depth < 10 then
      local fh = io.open(pandoc.path.join({ base_dir, path }), "r")
      if not fh then error("quarto-compat.lua: cannot open include " .. path) end
      local text = fh:read("a")
      fh:close()
      out:extend(expand_includes(pandoc.read(text, "markdown", PANDOC_READER_OPTIONS).blocks, depth + 1))
    else
      out:insert(blk)
    end
  end
  return out
end

local numbers = {}  -- id -> "Figure N" / "Table N"
local counts = { fig = 0, tbl = 0 }
local labels = { fig = "Figure", tbl = "Table" }

local function number(el)
  local kind = el.identifier:match("^(%a+)%-")
  if not labels[kind] then return nil end
  counts[kind] = counts[kind] + 1
  local label = labels[kind] .. " " .. counts[kind]
  numbers[el.identifier] = label
  local long = el.caption.long
  if #long > 0 and long[1].content then
    long[1].content:insert(1, pandoc.Str(label .. ": "))
  else
    long:insert(1, pandoc.Plain({ pandoc.Str(label) }))
  end
  el.caption.long = long
  return el
end

local callout_titles = { note = "Note", warning = "Warning", important = "Important", tip = "Tip", caution = "Caution" }

local function callout(div)
  for _, cls in ipairs(div.classes) do
    local kind = cls:match("^callout%-(%a+)$")
    if callout_titles[kind] then
      local title = div.attributes.title or callout_titles[kind]
      div.attributes.title = nil
      local head = pandoc.Div({ pandoc.Plain({ pandoc.Strong(pandoc.Inlines(title)) }) }, { class = "callout-title" })
      local body = pandoc.Div(div.content, { class = "callout-body" })
      return pandoc.Div({ head, body }, pandoc.Attr(div.identifier, { "callout", "callout-" .. kind }, div.attributes))
    end
  end
end

local function cite(el)
  if #el.citations == 1 then
    local id = el.citations[1].id
    if numbers[id] then return pandoc.Link(numbers[id], "#" .. id) end
  end
end

return {
  { Pandoc = function(doc) doc.blocks = expand_includes(doc.blocks, 0); return doc end },
  { Figure = number, Table = function(t) if t.identifier ~= "" then return number(t) end end },
  { Cite = cite, Div = callout },
}
