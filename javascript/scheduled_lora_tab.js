// The "Scheduled LoRA" tab: its Run buttons show the WebUI's own progress bar (the same
// requestProgress as txt2img), and "Use txt2img prompt" copies that tab's prompt.

function scheduledLoraSubmit(kind, args) {
    var id = randomId();
    var container = gradioApp().getElementById('scheduled_lora_' + kind + '_progress');
    var gallery = kind === 'sweep' ? gradioApp().getElementById('scheduled_lora_sweep_gallery') : null;
    requestProgress(id, container, gallery, function() {});
    var res = Array.from(args);
    res[0] = id;
    return res;
}

function scheduled_lora_submit_merge() {
    return scheduledLoraSubmit('merge', arguments);
}

function scheduled_lora_submit_sweep() {
    return scheduledLoraSubmit('sweep', arguments);
}

function scheduled_lora_txt2img_prompt(current) {
    var box = gradioApp().querySelector('#txt2img_prompt textarea');
    return box ? box.value : current;
}
