// Fiber context switch for the SIMT emulator (x86-64 System V).
//
// glibc's swapcontext saves the signal mask with a system call on every switch; a CUDA
// thread switches at every barrier and warp collective, so this saves only what the ABI
// makes callee-saved: rbx, rbp, r12-r15, the stack pointer, and the SSE/x87 control words
// (MXCSR, FPU CW), so a fiber always computes with its own rounding and denormal modes.
//
//   void lqlora_emu_switch(void** save_sp, void* load_sp)
//     pushes the callee-saved state on the current stack, stores rsp in *save_sp, loads
//     load_sp and pops the state saved there (by an earlier switch or by fiber setup).
//   lqlora_emu_fiber_entry
//     first "return address" of a new fiber: calls r13(r12) (fiber_main(thread)), which
//     never returns. Frame built by runtime.cpp's init_stack (layout below).
//
// Saved frame, from the saved rsp upwards: [mxcsr:4 fpucw:4] r15 r14 r13 r12 rbx rbp ret.
//
// A file-scope asm block in a C++ file, so that the build needs no assembler language.
#if defined(__x86_64__)
__asm__(
    "    .text\n"
    "    .p2align 4\n"
    "    .globl lqlora_emu_switch\n"
    "    .hidden lqlora_emu_switch\n"
    "    .type lqlora_emu_switch, @function\n"
    "lqlora_emu_switch:\n"
    "    .cfi_startproc\n"
    "    endbr64\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    subq $8, %rsp\n"
    "    stmxcsr (%rsp)\n"
    "    fnstcw 4(%rsp)\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    ldmxcsr (%rsp)\n"
    "    fldcw 4(%rsp)\n"
    "    addq $8, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    "    .cfi_endproc\n"
    "    .size lqlora_emu_switch, .-lqlora_emu_switch\n"
    "    .p2align 4\n"
    "    .globl lqlora_emu_fiber_entry\n"
    "    .hidden lqlora_emu_fiber_entry\n"
    "    .type lqlora_emu_fiber_entry, @function\n"
    "lqlora_emu_fiber_entry:\n"
    "    .cfi_startproc\n"
    "    .cfi_undefined rip\n"
    "    endbr64\n"
    "    movq %r12, %rdi\n"
    "    callq *%r13\n"
    "    ud2\n"
    "    .cfi_endproc\n"
    "    .size lqlora_emu_fiber_entry, .-lqlora_emu_fiber_entry\n"
);
#endif
